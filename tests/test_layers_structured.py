"""DropBlock2d, DropPath and drop_path_rates: block geometry, rates, rescale, schedule, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stats import assert_fraction, assert_mean
from torch import nn

from autodropout.layers.structured import DropBlock2d, DropPath, drop_path_rates


def paper_gamma(p: float, size: int, height: int, width: int) -> float:
    return p / size**2 * height * width / ((height - size + 1) * (width - size + 1))


def expected_drop_fraction(gamma: float, size: int, height: int, width: int) -> float:
    """1 - E[keep]: a pixel survives iff none of the valid corners whose block covers it fires."""

    def covering(index: int, length: int) -> int:
        return min(index, length - size) - max(0, index - size + 1) + 1

    keep = sum(
        (1.0 - gamma) ** (covering(i, height) * covering(j, width))
        for i in range(height)
        for j in range(width)
    )
    return 1.0 - keep / (height * width)


def dropped_maps(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool (maps, H, W) of dropped pixels for an all-ones input."""
    out = layer(torch.ones(shape))
    return (out == 0).reshape(-1, *shape[-2:])


def union_of_inner_squares(dropped: torch.Tensor, size: int) -> torch.Tensor:
    """Pixels covered by some fully dropped size x size square lying inside the map."""
    maps = dropped.float().unsqueeze(1)
    square_sums = F.conv2d(maps, torch.ones(1, 1, size, size))
    full = (square_sums == size * size).float()
    return F.max_pool2d(F.pad(full, [size - 1] * 4), size, stride=1).squeeze(1).bool()


# --- DropBlock2d: geometry ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("share", [False, True])
def test_dropped_set_is_union_of_whole_blocks_inside_the_map(size, share):
    dropped = dropped_maps(DropBlock2d(p=0.3, block_size=size, share_channels=share), (16, 3, 11, 9))
    assert dropped.any() and not dropped.all()
    assert torch.equal(union_of_inner_squares(dropped, size), dropped)


@pytest.mark.parametrize("size", [3, 4])
def test_corner_pixel_drop_rate_is_gamma_for_odd_and_even_blocks(size):
    # A corner pixel is covered by exactly one valid block: the one anchored in that corner.
    p, height, width = 0.4, 10, 12
    dropped = dropped_maps(DropBlock2d(p=p, block_size=size), (64, 32, height, width))
    gamma = paper_gamma(p, size, height, width)
    for row, col in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        corner = dropped[:, row, col].float()
        assert_fraction(corner.mean().item(), corner.numel(), gamma, what=f"corner {row, col}")


def test_block_as_large_as_the_map_drops_whole_maps():
    dropped = dropped_maps(DropBlock2d(p=0.5, block_size=4), (64, 16, 4, 4))
    per_map = dropped.flatten(1)
    assert torch.equal(per_map.all(1), per_map.any(1))
    assert_fraction(per_map.all(1).float().mean().item(), per_map.shape[0], 0.5)


# --- DropBlock2d: rates ------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "size"), [(0.3, 3), (0.2, 4), (0.1, 5), (0.7, 1)])
def test_drop_fraction_matches_gamma_derivation(p, size):
    height, width = 12, 13
    layer = DropBlock2d(p=p, block_size=size)
    fractions = torch.cat(
        [dropped_maps(layer, (64, 32, height, width)).float().mean((1, 2)) for _ in range(3)]
    )
    gamma = paper_gamma(p, size, height, width)
    expected = expected_drop_fraction(gamma, size, height, width)
    assert_mean(fractions.mean().item(), expected, fractions.std().item(), fractions.numel())


def test_shared_channel_drop_fraction_matches_gamma_derivation():
    p, size, height, width = 0.25, 3, 10, 10
    dropped = dropped_maps(DropBlock2d(p=p, block_size=size, share_channels=True), (4096, 2, 10, 10))
    fractions = dropped.float().mean((1, 2))[::2]  # one of the two identical channels per sample
    expected = expected_drop_fraction(paper_gamma(p, size, height, width), size, height, width)
    assert_mean(fractions.mean().item(), expected, fractions.std().item(), fractions.numel())


def test_channels_independent_unless_shared():
    x = torch.ones(4, 6, 12, 12)
    independent = DropBlock2d(p=0.4, block_size=3)(x) == 0
    shared = DropBlock2d(p=0.4, block_size=3, share_channels=True)(x) == 0
    assert torch.equal(shared, shared[:, :1].expand_as(shared))
    assert shared.any()
    assert all(not torch.equal(independent[:, 0], independent[:, c]) for c in range(1, 6))


@pytest.mark.parametrize("share", [False, True])
def test_rescale_is_numel_over_kept_exactly(share):
    out = DropBlock2d(p=0.3, block_size=3, share_channels=share)(torch.ones(8, 4, 10, 10))
    kept = int((out != 0).sum())
    assert 0 < kept < out.numel()
    scale = torch.tensor(out.numel() / kept, dtype=torch.float64).float()
    assert torch.equal(out[out != 0], scale.expand(kept))


def test_p_zero_is_identity_and_p_one_gives_zeros():
    x = torch.randn(2, 3, 8, 8)
    assert DropBlock2d(p=0.0, block_size=3)(x) is x
    for share in (False, True):
        for size in (1, 3, 8):
            out = DropBlock2d(p=1.0, block_size=size, share_channels=share)(x)
            assert torch.equal(out, torch.zeros_like(x))


# --- DropBlock2d: modes, gradient, randomness --------------------------------------------------


def test_eval_is_bit_exact_identity_and_does_not_count_steps():
    layer = DropBlock2d(p=0.5, block_size=3, warmup_steps=4).eval()
    x = torch.randn(2, 3, 8, 8)
    assert layer(x) is x
    assert int(layer.steps) == 0


def test_gradient_uses_the_forward_mask():
    x = torch.ones(4, 3, 10, 10, requires_grad=True)
    out = DropBlock2d(p=0.4, block_size=3)(x)
    grad = torch.randn_like(out)  # also moves the RNG on: a resampled mask would differ
    out.backward(grad)
    assert (out == 0).any()
    assert torch.equal(x.grad, grad * out.detach())


def test_fresh_mask_each_call_and_seed_reproducible():
    layer, x = DropBlock2d(p=0.3, block_size=3), torch.ones(4, 3, 10, 10)
    assert not torch.equal(layer(x), layer(x))
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), first)


# --- DropBlock2d: warm-up schedule -------------------------------------------------------------


def test_warmup_rate_rises_linearly_and_survives_state_dict():
    layer, x = DropBlock2d(p=0.4, block_size=3, warmup_steps=10), torch.randn(2, 3, 8, 8)
    assert layer.drop_rate().item() == 0.0
    assert torch.equal(layer(x), x)  # the first training forward drops nothing
    for _ in range(4):
        layer(x)
    assert layer.drop_rate().item() == pytest.approx(0.2, rel=1e-12)
    restored = DropBlock2d(p=0.4, block_size=3, warmup_steps=10)
    restored.load_state_dict(layer.state_dict())
    assert restored.drop_rate().item() == pytest.approx(0.2, rel=1e-12)
    for _ in range(10):
        layer(x)
    assert int(layer.steps) == 15
    assert layer.drop_rate().item() == pytest.approx(0.4, rel=1e-12)


def test_warmup_halfway_drop_fraction_matches_half_rate():
    p, size, height, width = 0.4, 3, 12, 12
    layer = DropBlock2d(p=p, block_size=size, warmup_steps=10)
    layer.steps.fill_(5)
    fractions = dropped_maps(layer, (128, 32, height, width)).float().mean((1, 2))
    expected = expected_drop_fraction(paper_gamma(p / 2, size, height, width), size, height, width)
    assert_mean(fractions.mean().item(), expected, fractions.std().item(), fractions.numel())


# --- DropBlock2d: arguments --------------------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.5, "0.1", None])
def test_bad_p(p):
    with pytest.raises(ValueError, match="p must be"):
        DropBlock2d(p=p)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "7"])
def test_bad_block_size(size):
    with pytest.raises(ValueError, match="block_size"):
        DropBlock2d(block_size=size)


def test_bad_warmup_steps():
    with pytest.raises(ValueError, match="warmup_steps"):
        DropBlock2d(warmup_steps=-1)


def test_block_larger_than_map_and_wrong_rank():
    with pytest.raises(ValueError, match=r"block_size=7.*6x9"):
        DropBlock2d(block_size=7)(torch.ones(1, 1, 6, 9))
    with pytest.raises(ValueError, match="4D"):
        DropBlock2d(block_size=3)(torch.ones(3, 8, 8))


def test_extra_repr():
    text = repr(DropBlock2d(p=0.2, block_size=5, share_channels=True, warmup_steps=3))
    assert "p=0.2, block_size=5, share_channels=True, warmup_steps=3" in text


# --- DropPath ----------------------------------------------------------------------------------


def test_drop_path_is_all_or_nothing_per_sample_with_keep_fraction():
    p = 0.3
    out = DropPath(p)(torch.ones(4096, 3, 5))
    per_sample = out.flatten(1)
    kept = per_sample[:, 0] != 0
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert torch.equal(per_sample[kept], torch.full_like(per_sample[kept], 1 / (1 - p)))
    assert_fraction(kept.float().mean().item(), kept.numel(), 1 - p, what="keep fraction")


def test_drop_path_without_scaling_keeps_values_and_accepts_rank_one():
    out = DropPath(0.5, scale_by_keep=False)(torch.ones(2048))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert_fraction(out.mean().item(), out.numel(), 0.5, what="keep fraction")


def test_drop_path_edge_rates_eval_and_rank_zero():
    x = torch.randn(8, 4)
    assert DropPath(0.0)(x) is x
    assert DropPath(0.7).eval()(x) is x
    assert torch.equal(DropPath(1.0)(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="rank"):
        DropPath(0.5)(torch.tensor(1.0))
    with pytest.raises(ValueError, match="p must be"):
        DropPath(1.2)
    assert "p=0.1, scale_by_keep=False" in repr(DropPath(0.1, scale_by_keep=False))


def test_drop_path_rates_follow_the_linear_rule():
    assert drop_path_rates(0.2, 4) == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert drop_path_rates(0.5, 1) == [0.5]
    with pytest.raises(ValueError, match="max_rate"):
        drop_path_rates(1.5, 3)
    with pytest.raises(ValueError, match="depth"):
        drop_path_rates(0.1, 0)


# --- compile, autocast, training ---------------------------------------------------------------


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.drop_block = DropBlock2d(p=0.1, block_size=3, warmup_steps=5)
        self.branch = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.drop_path = DropPath(0.2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop_block(torch.relu(self.stem(x)))
        h = h + self.drop_path(self.branch(h))
        return self.head(h.mean((2, 3)))


def test_compiles_without_graph_breaks():
    model = TinyResNet()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 1, 8, 8)
    for _ in range(3):
        out = compiled(x)
        out.sum().backward()
    assert torch.isfinite(out).all() and int(model.drop_block.steps) == 3


def test_bf16_autocast():
    conv, x = nn.Conv2d(3, 4, 1), torch.randn(4, 3, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        out = DropPath(0.5)(DropBlock2d(p=0.3, block_size=3)(h))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and (out == 0).any()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_tiny_training_loss_falls():
    labels = torch.randint(0, 2, (64,))
    images = torch.randn(64, 1, 8, 8) * 0.5
    images[:, :, :4] += (2 * labels - 1).float()[:, None, None, None]  # class sets the top half
    model = TinyResNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    model.eval()
    initial = F.cross_entropy(model(images), labels).item()
    model.train()
    for _ in range(40):
        optimiser.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimiser.step()
    model.eval()
    assert F.cross_entropy(model(images), labels).item() < 0.5 * initial
