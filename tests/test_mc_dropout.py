"""mc_dropout: eval everywhere but the dropout layers, nothing changes; mc_predict's moments."""

from __future__ import annotations

import math

import pytest
import torch
from stats import assert_mean
from torch import nn

from autodropout import CurriculumDropout, DropoutLayer, mc_dropout, mc_predict


def curriculum_at_target(p: float = 0.4) -> CurriculumDropout:
    layer = CurriculumDropout(p, total_steps=2, schedule="linear")
    layer.step.fill_(2)
    return layer


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        curriculum_at_target(),
        nn.Linear(8, 8),
        nn.AlphaDropout(0.2),
        nn.Linear(8, 2),
    )


def trained_model() -> nn.Sequential:
    """A model whose BatchNorm statistics are no longer the initial ones."""
    model = make_model()
    for _ in range(3):
        model(torch.randn(16, 4) * 3 + 1)
    return model


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_outputs_differ_across_passes():
    model = trained_model().eval()
    x = torch.randn(5, 4)
    with mc_dropout(model):
        first, second = model(x), model(x)
    assert not torch.equal(first, second)
    assert torch.equal(model(x), model(x))  # deterministic again after the block


@pytest.mark.parametrize("train_before", [False, True])
def test_running_stats_and_step_counters_are_unchanged_bit_exactly(train_before):
    model = trained_model().train(train_before)
    before = snapshot(model)
    assert int(before["1.num_batches_tracked"]) == 3 and int(before["4.step"]) == 2 + 3
    mc_predict(model, torch.randn(16, 4) * 5 - 2, samples=40)
    with mc_dropout(model):
        for _ in range(5):
            model(torch.randn(16, 4))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


def test_batchnorm_normalises_with_running_statistics():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.0))
    model(torch.randn(32, 4) + 2)  # running stats now differ from this batch's stats
    x = torch.randn(8, 4)
    with mc_dropout(model):
        sampled = model(x)
    model.eval()
    assert torch.equal(sampled, model(x))
    model.train()
    assert not torch.allclose(sampled, model(x))  # batch statistics would give another output


def test_only_dropout_layers_are_in_training_mode_inside():
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
        nn.Dropout(0.1),
        nn.Dropout2d(0.1),
        nn.AlphaDropout(0.1),
        nn.FeatureAlphaDropout(0.1),
        curriculum_at_target(),
        nn.Sequential(nn.LayerNorm(4), nn.Dropout(0.2)),
    )
    dropout_names = {"2", "3", "4", "5", "6", "7.1"}
    with mc_dropout(model) as inside:
        assert inside is model
        assert {name for name, training in flags(model).items() if training} == dropout_names
        assert model[6].mc_sampling and not model[6].updates_state


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_training_flags_are_restored_exactly(mode):
    model = make_model().train(mode != "eval")
    if mode == "mixed":
        model[1].eval()
        model[3].eval()
        model[5].train()
    before = flags(model)
    with mc_dropout(model):
        model(torch.randn(3, 4))
    assert flags(model) == before
    assert "mc_sampling" not in vars(model[4])
    assert model[4].updates_state == model[4].training


def test_flags_are_restored_when_the_block_raises():
    model = make_model().train()
    before = flags(model)
    with pytest.raises(RuntimeError, match="boom"), mc_dropout(model):
        raise RuntimeError("boom")
    assert flags(model) == before
    assert not model[4].mc_sampling


def test_nested_blocks_restore_the_outer_state():
    model = make_model()
    with mc_dropout(model):
        with mc_dropout(model[4]):
            pass
        assert model[4].mc_sampling and model[4].training and not model[1].training
    assert not model[4].mc_sampling and model[1].training


def test_updates_state_only_in_plain_training():
    layer = DropoutLayer()
    assert layer.updates_state
    assert not layer.eval().updates_state
    with mc_dropout(layer):
        assert layer.training and not layer.updates_state


def test_gradients_are_not_disabled_by_mc_dropout():
    model = make_model()
    with mc_dropout(model):
        assert model(torch.randn(3, 4)).requires_grad


def linear_dropout_moments(p: float, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor):
    """Mean, variance and 4th central moment of ``b + sum_i w_i x_i m_i / (1 - p)``.

    With ``c_i = w_i x_i`` and ``e_i = m_i / q - 1`` (q = 1 - p): ``e_i`` is ``p / q`` w.p. q and
    ``-1`` w.p. p, ``Var e = p / q``, ``E e^4 = p^4 / q^3 + p``. The sum of independent terms has
    ``mu_4 = 3 sigma^4 + sum_i c_i^4 (E e^4 - 3 (Var e)^2)`` (4th cumulants add).
    """
    q = 1.0 - p
    c = (weight * x).double()
    mean = c.sum(-1) + bias.double()
    var_e = p / q
    variance = var_e * c.pow(2).sum(-1)
    fourth = 3 * variance**2 + (p**4 / q**3 + p - 3 * var_e**2) * c.pow(4).sum(-1)
    return mean, variance, fourth


def test_mc_predict_matches_analytic_mean_and_variance_of_linear_dropout():
    p, samples = 0.3, 4000
    linear = nn.Linear(16, 1)
    model = nn.Sequential(nn.Dropout(p), linear).eval()
    x = torch.randn(6, 16)
    mean, variance = mc_predict(model, x, samples=samples)
    assert mean.shape == variance.shape == (6, 1)
    expected_mean, expected_var, fourth = linear_dropout_moments(p, linear.weight, linear.bias, x)
    for row in range(x.shape[0]):
        sigma2 = expected_var[row].item()
        assert_mean(mean[row, 0].item(), expected_mean[row].item(), math.sqrt(sigma2), samples)
        # Var(s^2) = (mu_4 - sigma^4 (T - 3) / (T - 1)) / T for the unbiased sample variance.
        spread = math.sqrt(fourth[row].item() - sigma2**2 * (samples - 3) / (samples - 1))
        assert_mean(variance[row, 0].item(), sigma2, spread, samples, what="variance")
    assert not model.training and not model[0].training


class Sequence(DropoutLayer):
    """Deterministic stand-in for a stochastic layer: multiplies by the next listed value."""

    def __init__(self, values):
        super().__init__()
        self.values = iter(values)

    def forward(self, x):
        return x * next(self.values)


def test_mc_predict_returns_sample_mean_and_unbiased_variance():
    values = [1.0, 2.0, 4.0, -3.0, 0.5]
    x = torch.tensor([[1.0, 10.0]])
    mean, variance = mc_predict(Sequence(values), x, samples=len(values))
    draws = torch.tensor(values)[:, None, None] * x
    assert torch.allclose(mean, draws.mean(0), rtol=1e-6, atol=0)
    assert torch.allclose(variance, draws.var(0, unbiased=True), rtol=1e-6, atol=0)


def test_mc_predict_runs_without_gradients_and_in_float32_for_bf16():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).to(torch.bfloat16)
    mean, variance = mc_predict(model, torch.randn(2, 4, dtype=torch.bfloat16), samples=5)
    assert mean.dtype == variance.dtype == torch.float32
    assert not mean.requires_grad and not variance.requires_grad
    assert bool((variance >= 0).all())


@pytest.mark.parametrize("samples", [1, 0, 2.5])
def test_mc_predict_needs_at_least_two_samples(samples):
    with pytest.raises(ValueError, match="samples"):
        mc_predict(nn.Dropout(0.5), torch.ones(3), samples=samples)
