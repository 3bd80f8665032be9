"""The child models: shapes, seed determinism, causal masking, and that they learn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.models import GPTLanguageModel, WideResNet, build_model

VOCAB = 11


def small_gpt(**kwargs) -> GPTLanguageModel:
    return GPTLanguageModel(VOCAB, context=16, d_model=32, n_layers=2, n_heads=4, **kwargs)


# -- WideResNet -------------------------------------------------------------------------------
def test_wide_resnet_shapes_and_layout():
    model = WideResNet(depth=16, width=2, num_classes=7, in_channels=3)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 7)
    blocks = [m for m in model.modules() if hasattr(m, "shortcut")]
    assert len(blocks) == 6  # depth 16 -> n = 2 blocks per group
    assert all(isinstance(block.shortcut, nn.Module) for block in blocks)
    assert [type(b.shortcut) for b in blocks].count(nn.Identity) == 3  # first of each projects
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 6 + 1


def test_wide_resnet_rejects_bad_depth_and_width():
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=12)
    with pytest.raises(ValueError, match="width"):
        WideResNet(width=0)
    with pytest.raises(ValueError, match="dropout"):
        WideResNet(dropout=1.5)


def test_gpt_shapes_and_dropout_sites():
    model = small_gpt(dropout=0.1)
    assert model(torch.randint(0, VOCAB, (3, 16))).shape == (3, 16, VOCAB)
    names = dict(model.named_modules())
    for name in ("transformer.drop", "transformer.h.1.attn.attn_dropout",
                 "transformer.h.1.attn.resid_dropout", "transformer.h.1.mlp.hidden_dropout",
                 "transformer.h.1.mlp.dropout"):
        assert isinstance(names[name], nn.Dropout) and names[name].p == 0.1
    assert model.lm_head.weight is model.transformer.wte.weight
    assert small_gpt(tie_embeddings=False).lm_head.weight is not None
    with pytest.raises(ValueError, match="context"):
        model(torch.randint(0, VOCAB, (1, 17)))


def test_gpt_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="n_heads"):
        GPTLanguageModel(VOCAB, d_model=30, n_heads=4)


def test_attention_probabilities_reach_attn_dropout_as_a_tensor():
    model = small_gpt().eval()
    seen = []
    model.transformer.h[0].attn.attn_dropout.register_forward_hook(
        lambda module, args, out: seen.append(out)
    )
    model(torch.randint(0, VOCAB, (2, 5)))
    (probs,) = seen
    assert probs.shape == (2, 4, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 5))
    assert torch.all(probs.triu(diagonal=1) == 0)


# -- determinism --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs", "make_input"),
    [
        ("wide_resnet", {"depth": 10, "width": 1}, lambda: torch.randn(2, 1, 28, 28)),
        ("gpt", {"vocab_size": VOCAB, "context": 16, "d_model": 32},
         lambda: torch.randint(0, VOCAB, (2, 16))),
    ],
)
def test_same_seed_same_model_and_output(name, kwargs, make_input):
    first, second = build_model(name, seed=3, **kwargs), build_model(name, seed=3, **kwargs)
    other = build_model(name, seed=4, **kwargs)
    x = make_input()
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), key
    assert torch.equal(first(x), second(x))
    assert not torch.equal(first(x), other(x))


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"name must be one of \[wrn, gpt\], got 'resnet50'"):
        build_model("resnet50")
    assert isinstance(build_model("wide_resnet", width=1), WideResNet)  # the alias of wrn
    assert isinstance(build_model("wrn", width=1), WideResNet)


# -- causality ---------------------------------------------------------------------------------
def test_gpt_output_at_t_ignores_later_tokens():
    model = small_gpt().eval()
    tokens = torch.randint(0, VOCAB, (2, 12))
    changed = tokens.clone()
    t = 6
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % VOCAB
    before, after = model(tokens), model(changed)
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


# -- learning ----------------------------------------------------------------------------------
def _train(model: nn.Module, batch, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model, *batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def classification_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def language_model_loss(model, idx, targets):
    return F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())


def test_wide_resnet_learns_a_fixed_batch():
    model = WideResNet(depth=10, width=1)
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    first, last = _train(model, (x, y), classification_loss, steps=15, lr=1e-2)
    assert last < 0.5 * first


def test_gpt_learns_a_counting_sequence():
    model = small_gpt(dropout=0.1)
    start = torch.randint(0, VOCAB, (16, 1))
    sequence = (start + torch.arange(17)) % VOCAB  # next token = previous + 1 (mod VOCAB)
    first, last = _train(model, (sequence[:, :-1], sequence[:, 1:]), language_model_loss,
                         steps=30, lr=3e-3)
    assert last < 0.5 * first
