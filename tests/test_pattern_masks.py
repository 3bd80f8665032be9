"""PatternDropout: conv tile masks, sequence span masks, scaling, modes, compile and autocast."""

from __future__ import annotations

import math

import pytest
import torch
from stats import Z

from autodropout import Pattern, PatternDropout
from autodropout.patterns import masks
from autodropout.patterns.masks import Tiling

CONV = dict(
    size_h=3, size_w=5, stride=8, repeat="fill", rotate=0.0, shear_x=0.0, shear_y=0.0,
    share_c=False, residual=False,
)
SEQUENCE = dict(
    size=3, stride=10, repeat=2, axis="tokens", share=True,
    apply_to=["embedding", "attention_probs", "ffn_hidden"],
)


def conv(**changes) -> PatternDropout:
    return PatternDropout({**CONV, **changes})


def sequence(sublayer: str | None = None, **changes) -> PatternDropout:
    return PatternDropout({**SEQUENCE, **changes}, "sequence", sublayer)


def runs(dropped: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D boolean tensor."""
    padded = torch.cat([torch.zeros(1, dtype=torch.int8), dropped.to(torch.int8),
                        torch.zeros(1, dtype=torch.int8)])
    edges = padded.diff()
    starts = (edges == 1).nonzero().flatten()
    ends = (edges == -1).nonzero().flatten()
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


# conv masks ---------------------------------------------------------------------------------


def test_share_c_gives_one_mask_for_all_channels():
    layer = conv(share_c=True).train()
    y = layer(torch.ones(4, 6, 16, 16))
    assert layer.keep_mask(torch.ones(4, 6, 16, 16)).shape == (4, 1, 16, 16)
    assert torch.equal(y, y[:, :1].expand_as(y))
    assert (y == 0).any()


def test_per_channel_masks_differ():
    keep = conv().keep_mask(torch.ones(2, 16, 16, 16))
    assert keep.shape == (2, 16, 16, 16)
    # 64 equally likely offsets per channel: 16 identical channels has probability 64**-15.
    assert not torch.equal(keep, keep[:, :1].expand_as(keep))


@pytest.mark.parametrize("height, width", [(32, 32), (96, 80)])  # table path, direct path
def test_tiles_that_always_fit_give_the_exact_kept_count(height, width):
    layer = conv(size_h=3, size_w=2, stride=8, repeat=2)
    keep = layer.keep_mask(torch.ones(8, 4, height, width))
    dropped = (2 * 3) * (2 * 2)  # span 8 + 3 <= height: both tiles lie inside the map
    assert torch.equal(keep.sum((2, 3)), torch.full((8, 4), height * width - dropped))
    combinations = masks.offset_range(height, 3, 8, 2) * masks.offset_range(width, 2, 8, 2)
    assert (combinations * height * width <= masks.TABLE_LIMIT) == (height == 32)


def test_fill_tiles_the_map_periodically():
    keep = conv().keep_mask(torch.ones(4, 3, 32, 40))
    assert torch.equal(keep[..., 8:, :], keep[..., :-8, :])
    assert torch.equal(keep[..., :, 8:], keep[..., :, :-8])
    dropped_rows = ~keep.all(-1)  # rows crossing a tile
    assert torch.equal(dropped_rows.sum(-1), torch.full((4, 3), 3 * 32 // 8))
    assert torch.equal((~keep).sum((2, 3)), torch.full((4, 3), (3 * 4) * (5 * 5)))


def test_tiles_wider_than_the_stride_drop_everything_without_nan():
    layer = conv(size_h=8, size_w=9).train()
    y = layer(torch.ones(2, 3, 16, 16))
    assert torch.equal(y, torch.zeros_like(y))


def test_offsets_cover_every_phase():
    keep = conv(share_c=True).keep_mask(torch.ones(2000, 1, 8, 8))
    # 8 x 8 equally likely phases; missing one in 2000 draws has probability < 64 * e**-31.
    assert torch.unique(keep.flatten(1), dim=0).shape[0] == 64


def centred_rectangle(rotate: float, height: int = 4, width: int = 20) -> torch.Tensor:
    """Dropped set of one rectangle at the centre of a 48 x 48 map, rotated about it."""
    tiling = Tiling(extents=(48, 48), sizes=(height, width), stride=1, repeat=1,
                    affine=(rotate, 0.0, 0.0))
    offsets = [torch.tensor([24 - height // 2]), torch.tensor([24 - width // 2])]
    return tiling.dropped(offsets)[0]


def test_rotation_changes_the_mask_and_keeps_its_area_within_rounding():
    upright, turned = centred_rectangle(0.0, 12, 20), centred_rectangle(45.0, 12, 20)
    assert int(upright.sum()) == 12 * 20
    assert not torch.equal(upright, turned)
    # The dropped pixels are the pixel centres inside the rotated rectangle (area 240,
    # perimeter 64, fully inside the map). For a convex region the lattice point count N
    # obeys A - P/2 < N <= A + P/2 + 1 (Nosarzewska, 1948).
    assert 240 - 64 / 2 < int(turned.sum()) <= 240 + 64 / 2 + 1
    rows, cols = turned.nonzero().float().unbind(1)
    assert abs(rows.mean() - 23.5) <= 0.5 and abs(cols.mean() - 23.5) <= 0.5


def test_rotation_is_counter_clockwise_about_the_centre():
    turned = centred_rectangle(90.0)
    assert torch.equal(turned, centred_rectangle(0.0, 20, 4))  # exact: centres map to centres
    rows, cols = centred_rectangle(30.0).nonzero().float().unbind(1)
    # Row indices grow downwards, so a bar turned counter-clockwise rises to the right.
    assert ((rows - rows.mean()) * (cols - cols.mean())).mean() < 0


def test_shear_preserves_area_within_rounding():
    tiling = Tiling(extents=(48, 48), sizes=(12, 12), stride=1, repeat=1, affine=(0.0, 0.5, 0.0))
    sheared = tiling.dropped([torch.tensor([18]), torch.tensor([18])])[0]
    # A parallelogram of area 144 with sides 12 and 12 * sqrt(1.25): Nosarzewska again.
    perimeter = 2 * (12 + 12 * math.sqrt(1.25))
    assert 144 - perimeter / 2 < int(sheared.sum()) <= 144 + perimeter / 2 + 1
    assert not torch.equal(sheared, centred_rectangle(0.0, 12, 12))


# scaling, modes, randomness -----------------------------------------------------------------


def per_pixel_mean_is_one(y: torch.Tensor, keep_probability: float) -> None:
    """Each pixel's mean over the batch is 1 (x = 1), within Z sigma of the sampling error."""
    n = y.shape[0]
    std = math.sqrt((1 - keep_probability) / keep_probability)  # of y = m / q
    deviation = (y.mean(0) - 1).abs().max()
    assert deviation <= Z * std / math.sqrt(n), f"max deviation {deviation:.4f}"


@pytest.mark.parametrize("rotate", [0.0, 30.0])
def test_expectation_is_preserved_for_fill_patterns(rotate):
    # Every output pixel samples one source pixel; with a uniform phase it is dropped with
    # probability (3/8) * (5/8) whatever the rotation or shear.
    layer = conv(rotate=rotate, shear_x=0.2, share_c=True).train()
    y = layer(torch.ones(3000, 1, 12, 12))
    per_pixel_mean_is_one(y[:, 0], 1 - 15 / 64)


def test_rescale_keeps_the_batch_total():
    layer = conv(size_h=4, size_w=6, stride=3, repeat=2, rotate=20.0).train()
    x = torch.ones(8, 3, 16, 16)
    y = layer(x)
    assert (y == 0).any()
    torch.testing.assert_close(y.sum(), x.sum())


def test_eval_is_identity():
    layer = conv().eval()
    x = torch.randn(2, 3, 8, 8)
    assert layer(x) is x
    tokens = torch.randn(2, 5, 4, requires_grad=True)
    assert sequence().eval()(tokens) is tokens


def test_masks_differ_across_calls_and_examples():
    layer = conv(share_c=True)
    x = torch.ones(16, 1, 16, 16)
    first, second = layer.keep_mask(x), layer.keep_mask(x)
    assert not torch.equal(first, second)
    assert not torch.equal(first, first[:1].expand_as(first))


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (4, 3, 96, 96)])
def test_masks_are_reproducible_under_manual_seed(shape):
    layer = conv(repeat=2, rotate=15.0)
    torch.manual_seed(7)
    first = layer.keep_mask(torch.ones(shape))
    torch.manual_seed(7)
    assert torch.equal(first, layer.keep_mask(torch.ones(shape)))


def test_gradient_uses_the_forward_mask():
    layer = conv(rotate=10.0).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad * x.detach(), y.detach())
    assert (x.grad == 0).any()


# sequence masks ------------------------------------------------------------------------------


def test_token_spans_have_the_size_stride_and_repeat():
    keep = sequence().keep_mask(torch.ones(64, 40, 8))
    assert keep.shape == (64, 40, 1)
    for example in keep[:, :, 0]:
        spans = runs(~example)
        assert [length for _, length in spans] == [3, 3]
        assert spans[1][0] - spans[0][0] == 10


@pytest.mark.parametrize("tokens", [40, 1100])  # table path, direct path
def test_token_spans_drawn_per_feature(tokens):
    layer = sequence(share=False).train()
    combinations = masks.offset_range(tokens, 3, 10, 2)
    assert (combinations * tokens <= masks.TABLE_LIMIT) == (tokens == 40)
    x = torch.ones(2, tokens, 3)
    torch.manual_seed(1)
    keep = layer.keep_mask(x)
    assert keep.shape == (2, tokens, 3)
    for column in keep.transpose(1, 2).flatten(0, 1):
        (first, length), (second, _) = runs(~column)
        assert length == 3 and second - first == 10
    torch.manual_seed(1)
    assert torch.equal(layer(x) == 0, ~keep)  # forward applies the same draw


def test_token_spans_per_feature_unless_shared():
    keep = sequence(share=False, repeat="fill").keep_mask(torch.ones(4, 40, 16))
    assert keep.shape == (4, 40, 16)
    assert torch.equal((~keep).sum(1), torch.full((4, 16), 12))
    assert not torch.equal(keep, keep[..., :1].expand_as(keep))


def test_feature_spans_shared_or_per_token():
    shared = sequence(axis="features").keep_mask(torch.ones(4, 7, 30))
    assert shared.shape == (4, 1, 30)
    assert torch.equal((~shared).sum(-1), torch.full((4, 1), 6))
    own = sequence(axis="features", share=False).keep_mask(torch.ones(4, 7, 30))
    assert own.shape == (4, 7, 30)
    assert torch.equal((~own).sum(-1), torch.full((4, 7), 6))
    assert not torch.equal(own, own[:, :1].expand_as(own))


def test_both_axes_drop_square_tiles():
    keep = sequence(axis="both", repeat="fill").keep_mask(torch.ones(4, 40, 20))
    assert keep.shape == (4, 40, 20)
    assert torch.equal((~keep).sum((1, 2)), torch.full((4,), (4 * 3) * (2 * 3)))
    assert torch.equal(keep[:, 10:], keep[:, :-10])


def test_attention_probs_spans_run_over_keys():
    probs = torch.ones(3, 4, 6, 40)
    keys = sequence("attention_probs").keep_mask(probs)
    assert keys.shape == (3, 1, 1, 40)
    assert all([n for _, n in runs(~k)] == [3, 3] for k in keys.flatten(0, 2))
    per_query = sequence("attention_probs", axis="features", share=False).keep_mask(probs)
    assert per_query.shape == (3, 4, 6, 40)
    assert torch.equal((~per_query).sum(-1), torch.full((3, 4, 6), 6))
    assert not torch.equal(per_query, per_query[:, :, :1].expand_as(per_query))
    tiles = sequence("attention_probs", axis="both", share=False).keep_mask(probs)
    assert tiles.shape == (3, 4, 6, 40)
    with pytest.raises(ValueError, match="input must be 4D"):
        sequence("attention_probs")(torch.ones(3, 6, 40))


# arguments -------------------------------------------------------------------------------


def test_bad_input_rank_raises():
    with pytest.raises(ValueError, match="input must be 4D"):
        conv()(torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="input must be 3D"):
        sequence("ffn_hidden").keep_mask(torch.ones(2, 3, 8, 8))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="site.stride"):
        conv(stride=0)
    with pytest.raises(ValueError, match="kind"):
        PatternDropout(CONV, "recurrent")
    with pytest.raises(ValueError, match="sublayer"):
        PatternDropout(CONV, "conv", "ffn_hidden")
    with pytest.raises(ValueError, match="sublayer"):
        sequence("ffn_output")
    with pytest.raises(ValueError, match="index"):
        PatternDropout.from_pattern(Pattern("conv", [CONV]), 1)


def test_from_pattern_site_and_repr():
    pattern = Pattern("sequence", [SEQUENCE, {**SEQUENCE, "size": 5}])
    layer = PatternDropout.from_pattern(pattern, 1, "attention_probs")
    assert (layer.kind, layer.sublayer, layer.site["size"]) == ("sequence", "attention_probs", 5)
    with pytest.raises(TypeError):
        layer.site["size"] = 2
    assert "size=5, stride=10, repeat=2, axis=tokens" in repr(layer)
    assert "size=3x5, stride=8, repeat=fill, share_c=False" in repr(conv())
    assert "rotate=30, shear=(0.5, 0)" in repr(conv(rotate=30.0, shear_x=0.5))


# compile and autocast -------------------------------------------------------------------------


def test_torch_compile_smoke():
    layer = conv(rotate=20.0).train()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=False)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    y = compiled(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad * x.detach(), y.detach())
    assert (y == 0).any() and not torch.equal(compiled(x), y)


def test_bf16_autocast():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), conv(share_c=True)).train()
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert (y == 0).any() and net[0].weight.grad is not None


# p_tile / p_apply ---------------------------------------------------------------------------


def test_p_tile_drops_whole_tiles_independently():
    layer = conv(size_h=4, size_w=4, stride=4, p_tile=0.5)
    keep = layer.keep_mask(torch.ones(64, 4, 16, 16))  # 4x4 cells, phase random per map
    assert keep.shape == (64, 4, 16, 16)
    dropped = (~keep).double()
    # a cell is all dropped or all kept: a pixel and the pixel 4 rows/columns away are in
    # different cells, neighbours inside a cell mostly share it
    fraction = dropped.mean().item()
    assert abs(fraction - 0.5) <= Z * math.sqrt(0.25 / (64 * 4 * 16))
    assert "p_tile=0.5" in repr(layer) and "p_apply" not in repr(layer)
    far = (dropped[..., 4:, :] * dropped[..., :-4, :]).mean().item()
    assert abs(far - 0.25) < 0.03  # independent cells


def test_p_apply_keeps_whole_maps_and_the_scale_keeps_the_total():
    layer = conv(p_apply=0.25).train()  # drops 3/8 * 5/8 of an applied map
    keep = layer.keep_mask(torch.ones(256, 8, 16, 16))
    untouched = keep.all(-1).all(-1).double().mean().item()
    assert abs(untouched - 0.75) <= Z * math.sqrt(0.75 * 0.25 / (256 * 8))
    y = layer(torch.ones(32, 8, 16, 16))
    assert y.sum().item() == pytest.approx(32 * 8 * 16 * 16, rel=1e-5)


def test_default_p_fields_leave_the_site_as_before():
    assert "p_apply" not in PatternDropout({**CONV, "p_apply": 1.0, "p_tile": 1.0}).site
    torch.manual_seed(0)
    a = conv().keep_mask(torch.ones(4, 3, 16, 16))
    torch.manual_seed(0)
    b = PatternDropout({**CONV, "p_apply": 1.0, "p_tile": 1.0}).keep_mask(torch.ones(4, 3, 16, 16))
    assert torch.equal(a, b)
