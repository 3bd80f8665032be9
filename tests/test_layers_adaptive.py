"""Standout, Jumpout and RelevanceDropout: rates, rescaling, refresh, eval, training."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate
from scipy import stats as scipy_stats
from stats import Z, assert_fraction, assert_mean
from torch import nn

from autodropout.layers import Jumpout, RelevanceDropout, Standout
from autodropout.layers.adaptive import capped_rates_with_mean

# the two-sided normal tail beyond Z: the same false-failure rate as the z-bounds of stats.py
KS_ALPHA = math.erfc(Z / math.sqrt(2.0))


def truncated_half_normal(p_min: float, p_max: float, sigma: float):
    """``|N(0, sigma^2)|`` conditioned on ``[p_min, p_max]``: ``sampling="truncated"``."""
    return scipy_stats.truncnorm(p_min / sigma, p_max / sigma, loc=0.0, scale=sigma)


class Algorithm1Rates:
    """Exact law of ``p = min(p_min + |N(0, sigma^2)|, p_max)`` (Jumpout, Algorithm 1, line 2).

    A point mass ``atom = P(|N| >= p_max - p_min)`` at ``p_max`` and, below it, the half-normal
    shifted to ``p_min``: conditioned on ``p < p_max`` that is ``continuous``, a normal of
    scale ``sigma`` truncated to ``[p_min, p_max]`` around the mean ``p_min``.
    """

    def __init__(self, p_min: float, p_max: float, sigma: float) -> None:
        self.p_min, self.p_max, self.sigma = p_min, p_max, sigma
        self.atom = 2.0 * scipy_stats.norm.sf((p_max - p_min) / sigma)
        self.continuous = scipy_stats.truncnorm(0.0, (p_max - p_min) / sigma, loc=p_min, scale=sigma)

    def expect(self, g, kinks=()) -> float:
        """``E[g(p)]``; ``kinks`` are where ``g`` is not smooth (for the quadrature)."""
        inner = [k for k in kinks if self.p_min < k < self.p_max]
        smooth, _ = integrate.quad(
            lambda t: g(t) * self.continuous.pdf(t), self.p_min, self.p_max, points=inner or None
        )
        return (1.0 - self.atom) * smooth + self.atom * g(self.p_max)


def assert_algorithm1_rates(rates: torch.Tensor, p_min: float, p_max: float, sigma: float):
    """KS test of the part below ``p_max`` against its conditional CDF, binomial test of the atom."""
    reference = Algorithm1Rates(p_min, p_max, sigma)
    values = rates.double().numpy()
    top = float(torch.tensor(p_max, dtype=torch.float32))  # p_max as the float32 rates hold it
    assert values.min() >= float(torch.tensor(p_min, dtype=torch.float32)) and values.max() <= top
    at_top = values == top
    assert_fraction(at_top.mean(), values.size, reference.atom, what="point mass at p_max")
    ks = scipy_stats.kstest(values[~at_top], reference.continuous.cdf)
    assert ks.pvalue > KS_ALPHA, f"below p_max: KS D={ks.statistic:.4f}, p={ks.pvalue:.3g}"
    return ks


def binary_relu_input(rows: int, features: int, active_fraction: float) -> torch.Tensor:
    """Post-ReLU-like input whose every row has exactly ``active_fraction`` positive entries."""
    active = round(features * active_fraction)
    values = torch.rand(rows, features) + 0.5
    order = torch.rand(rows, features).argsort(dim=1)
    return values * (order < active).float()


# ---------------------------------------------------------------- Standout


def make_standout(alpha=2.0, beta=-0.5, activation=None) -> Standout:
    return Standout(nn.Linear(3, 6), alpha=alpha, beta=beta, activation=activation)


def test_standout_keep_rate_matches_pi_per_unit():
    layer = make_standout(activation=nn.Identity())
    rows, repeats = torch.randn(4, 3), 5000
    keep_probability = 1.0 - layer.drop_probability(rows)
    assert keep_probability.min() < 0.3 and keep_probability.max() > 0.7  # a real spread
    with torch.no_grad():
        kept = (layer(rows.repeat(repeats, 1)) != 0).float().view(repeats, 4, 6).mean(0)
    for observed, expected in zip(kept.flatten().tolist(), keep_probability.flatten().tolist()):
        assert_fraction(observed, repeats, expected, what="standout keep rate")


def test_standout_training_is_unscaled_and_eval_is_the_expectation():
    layer = make_standout()
    x = torch.randn(256, 3)
    with torch.no_grad():
        activation = torch.relu(layer.module(x))
        y = layer(x)
        kept = y != 0
        assert torch.equal(y[kept], activation[kept])
        layer.eval()
        keep_probability = torch.sigmoid(2.0 * layer.module(x) - 0.5)
        torch.testing.assert_close(layer(x), keep_probability * activation, rtol=0, atol=0)
        torch.testing.assert_close(layer.drop_probability(x), 1.0 - keep_probability)


def test_standout_gradient_does_not_flow_through_pi():
    layer = make_standout().eval()
    x = torch.randn(32, 3)
    layer(x).sum().backward()
    through_layer = layer.module.weight.grad.clone()
    layer.zero_grad()
    pre_activation = layer.module(x)
    pi = torch.sigmoid(2.0 * pre_activation - 0.5).detach()
    (pi * torch.relu(pre_activation)).sum().backward()
    torch.testing.assert_close(through_layer, layer.module.weight.grad)


def test_standout_custom_activation_and_extreme_parameters():
    x = torch.randn(64, 3)
    tanh_layer = make_standout(activation=torch.tanh).eval()
    expected = (1 - tanh_layer.drop_probability(x)) * torch.tanh(tanh_layer.module(x))
    torch.testing.assert_close(tanh_layer(x), expected)
    for alpha, beta in [(1e6, -1e6), (-1e6, 1e6), (0.0, 50.0), (0.0, -50.0)]:
        layer = make_standout(alpha=alpha, beta=beta)
        out = layer(x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(layer.module.weight.grad).all()
        assert torch.isfinite(layer.eval()(x)).all()
    assert torch.equal(make_standout(beta=-50.0)(x), torch.zeros(64, 6))


# ---------------------------------------------------------------- Jumpout


# Algorithm 1's defaults (p_min, p_max from section 3.4, sigma = p_max / 2), and two settings
# where p_min is large against sigma, so that the shape below p_max tells the shifted
# half-normal of Algorithm 1 from the half-normal truncated at p_min (KS distance 0.19-0.20).
ALGORITHM1_SETTINGS = [(0.01, 0.6, None), (0.1, 0.5, 0.1), (0.2, 0.6, 0.2)]


@pytest.mark.parametrize(("p_min", "p_max", "sigma"), ALGORITHM1_SETTINGS)
def test_jumpout_sampled_rates_follow_algorithm_1(p_min, p_max, sigma):
    layer = Jumpout(p_min=p_min, p_max=p_max, sigma=sigma)
    rates = layer.sample_rates(20000)
    assert rates.dtype == torch.float32 and rates.shape == (20000,)
    assert_algorithm1_rates(rates, p_min, p_max, layer.sigma)


def test_jumpout_algorithm_1_check_rejects_the_truncated_half_normal():
    """The check above can fail: the truncated sampler (the layer's old default) fails it."""
    truncated = Jumpout(p_min=0.2, p_max=0.6, sigma=0.2, sampling="truncated").sample_rates(20000)
    with pytest.raises(AssertionError, match="point mass at p_max"):
        assert_algorithm1_rates(truncated, 0.2, 0.6, 0.2)
    below = truncated[truncated < 0.6].double().numpy()
    continuous = Algorithm1Rates(0.2, 0.6, 0.2).continuous
    assert scipy_stats.kstest(below, continuous.cdf).pvalue < KS_ALPHA


@pytest.mark.parametrize(("p_min", "p_max", "sigma"), [(0.01, 0.6, None), (0.05, 0.5, 0.1)])
def test_jumpout_truncated_sampling_follows_the_truncated_half_normal(p_min, p_max, sigma):
    layer = Jumpout(p_min=p_min, p_max=p_max, sigma=sigma, sampling="truncated")
    rates = layer.sample_rates(20000)
    assert rates.dtype == torch.float32 and rates.min() >= p_min and rates.max() <= p_max
    reference = truncated_half_normal(p_min, p_max, layer.sigma)
    assert scipy_stats.kstest(rates.numpy(), reference.cdf).pvalue > KS_ALPHA
    # the density decreases: far more mass in the lower than in the upper half of the range
    middle = (p_min + p_max) / 2
    assert (rates < middle).float().mean() > 0.6


def test_jumpout_forward_draws_rates_from_algorithm_1():
    per_sample = Jumpout(per_sample=True, record_rates=True)
    per_sample(binary_relu_input(20000, 8, 0.5))
    assert per_sample.last_rates.shape == (20000,)
    assert_algorithm1_rates(per_sample.last_rates, 0.01, 0.6, 0.3)
    per_batch = Jumpout(record_rates=True)
    rates = []
    for _ in range(4000):
        per_batch(binary_relu_input(2, 8, 0.5))
        rates.append(per_batch.last_rates)
    assert per_batch.last_rates.shape == (1,)
    assert_algorithm1_rates(torch.cat(rates), 0.01, 0.6, 0.3)
    assert Jumpout().last_rates is None


def deactivation_moments(rates: Algorithm1Rates, q: float, active: int, units: int):
    """Mean and sd of the deactivated fraction of ``units`` units, ``active = q units`` of them
    active, under Algorithm 1: ``p' = min(p / q, 1)``, dropped ~ Binomial(active, p'), and
    the fraction's mean is ``E[min(p, q)]``."""
    normalised = lambda p: min(p / q, 1.0)  # noqa: E731
    mean = rates.expect(lambda p: min(p, q), kinks=[q])
    second = rates.expect(lambda p: min(p, q) ** 2, kinks=[q])
    binomial = rates.expect(lambda p: active * normalised(p) * (1 - normalised(p)), kinks=[q])
    return mean, math.sqrt(second - mean**2 + binomial / units**2)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "per_call"])
def test_jumpout_deactivated_fraction_at_a_known_active_fraction_is_algorithm_1s(per_sample):
    """Every row has q+ = 0.5: the layer loses E[min(p, 0.5)] = 0.2365 of its units (the
    p_max cap of the normalised rate gave E[min(p, 0.3)], 0.19 with the truncated sampler)."""
    layer = Jumpout(p_min=0.01, p_max=0.6, sigma=0.3, per_sample=per_sample)
    reference = Algorithm1Rates(0.01, 0.6, 0.3)
    rows, features = (20000, 40) if per_sample else (2, 40)
    calls = 1 if per_sample else 4000
    fractions = []
    for _ in range(calls):
        x = binary_relu_input(rows, features, 0.5)
        y = layer(x)
        deactivated = ((x > 0) & (y == 0)).float()
        fractions.append(deactivated.mean(1) if per_sample else deactivated.mean().reshape(1))
    fractions = torch.cat(fractions)
    units = features if per_sample else rows * features
    mean, std = deactivation_moments(reference, 0.5, units // 2, units)
    assert abs(mean - 0.2365) < 5e-4  # the figure above, from the quadrature
    assert_mean(fractions.mean().item(), mean, std, fractions.numel(), what="deactivated fraction")


def test_jumpout_rate_among_active_units_is_normalised_by_the_active_fraction():
    # q+ = 0.25: every p > 0.25 asks for more than the active units, so p' = 1 drops them all
    layer = Jumpout(p_min=0.05, p_max=0.6, sigma=0.2, record_rates=True)
    x = binary_relu_input(200, 100, 0.25)
    active = x > 0
    capped = 0
    for _ in range(80):
        y = layer(x)
        rate = layer.last_rates.item()
        active_rate = min(rate / 0.25, 1.0)
        capped += active_rate == 1.0
        dropped = (y[active] == 0).float()
        assert_fraction(dropped.mean().item(), dropped.numel(), active_rate, what="active drop")
        assert torch.equal(y[~active], torch.zeros_like(y[~active]))
        survivors = y[active] != 0
        if active_rate < 1.0:
            scale = (1.0 - active_rate) ** -0.75
            torch.testing.assert_close(y[active][survivors], x[active][survivors] * scale)
        else:
            assert not survivors.any()
    assert 0 < capped < 80  # both regimes seen: P(p > 0.25) = 0.32 per call, 0.68^80 < 1e-13


@pytest.mark.parametrize("per_sample", [False, True], ids=["one_rate", "rate_per_sample"])
@pytest.mark.parametrize("active_fraction", ["batch", "sample"])
def test_jumpout_normalises_by_the_chosen_active_fraction(per_sample, active_fraction):
    """Rows with q+ = 0.25 and 0.75: the batch's q+ is 0.5 (the mean of the rows' own)."""
    layer = Jumpout(
        p_min=0.01, p_max=0.6, sigma=0.3, per_sample=per_sample,
        active_fraction=active_fraction, record_rates=True,
    )
    fractions = (0.25, 0.75)
    x = torch.cat([binary_relu_input(2000, 40, fraction) for fraction in fractions])
    y = layer(x)
    rates = layer.last_rates
    assert rates.shape == ((4000,) if per_sample else (1,))
    rates = rates.expand(4000)
    for group, fraction in enumerate(fractions):
        rows = slice(group * 2000, (group + 1) * 2000)
        q = fraction if active_fraction == "sample" else 0.5
        active_rates = (rates[rows] / q).clamp(max=1.0)
        active = x[rows] > 0
        dropped = ((y[rows] == 0) & active).sum(1).float()
        actives = active.sum(1).float()
        expected = (actives * active_rates).sum()
        std = (actives * active_rates * (1 - active_rates)).sum().sqrt()
        assert abs(dropped.sum() - expected) <= Z * std + 1e-6, f"active fraction {fraction}"
        scale = (1.0 - active_rates).pow(-0.75).unsqueeze(1).expand_as(x[rows])
        survivors = y[rows] != 0
        torch.testing.assert_close(y[rows][survivors], (x[rows] * scale)[survivors])
        assert torch.equal(y[rows][~active], torch.zeros_like(y[rows][~active]))


@pytest.mark.parametrize("sampling", ["algorithm1", "truncated"])
def test_jumpout_edge_parameters(sampling):
    x = binary_relu_input(64, 16, 0.5)
    assert torch.equal(Jumpout(p_min=0.0, p_max=0.0, sampling=sampling)(x), x)
    assert torch.equal(Jumpout(p_min=1.0, p_max=1.0, sampling=sampling)(x), torch.zeros_like(x))
    tiny_sigma = Jumpout(p_min=0.2, p_max=0.6, sigma=1e-12, sampling=sampling)
    assert torch.equal(tiny_sigma.sample_rates(100), torch.full((100,), 0.2))
    huge_sigma = Jumpout(sigma=1e9, sampling=sampling).sample_rates(1000)
    assert torch.isfinite(huge_sigma).all() and huge_sigma.min() >= 0.01
    assert huge_sigma.max() <= torch.tensor(0.6)
    for per_sample in (False, True):
        for active_fraction in ("batch", "sample"):
            layer = Jumpout(p_max=1.0, sampling=sampling, per_sample=per_sample,
                            active_fraction=active_fraction)
            assert torch.equal(layer(torch.zeros(8, 16)), torch.zeros(8, 16))
            lone = torch.zeros(8, 16)
            lone[0, 0] = 1.0  # q+ = 1/128: almost every p exceeds it, p' = 1, no inf * 0
            source = x.clone().requires_grad_()
            for inputs in (lone, source):
                out = layer(inputs)
                assert torch.isfinite(out).all()
            out.sum().backward()
            assert torch.isfinite(source.grad).all()
    with pytest.raises(ValueError, match="rank >= 2"):
        Jumpout(per_sample=True)(torch.rand(5))
    with pytest.raises(ValueError, match="rank >= 2"):
        Jumpout(active_fraction="sample")(torch.rand(5))
    assert Jumpout()(torch.rand(5)).shape == (5,)
    assert Jumpout()(torch.tensor(2.0)).shape == ()


@pytest.mark.parametrize(
    "options",
    [
        {"per_sample": True, "active_fraction": "sample"},
        {"sampling": "truncated", "record_rates": True},
    ],
    ids=["algorithm1_per_sample", "truncated_per_call"],
)
def test_jumpout_compiles_without_graph_breaks(options):
    layer = Jumpout(**options)
    compiled = torch.compile(layer, fullgraph=True)
    x = binary_relu_input(64, 32, 0.5).requires_grad_()
    y = compiled(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.equal(y[x <= 0], torch.zeros_like(y[x <= 0]))
    assert compiled.eval()(x) is x


# ---------------------------------------------------------------- RelevanceDropout


def test_capped_rates_have_the_target_mean_and_keep_the_order():
    torch.testing.assert_close(
        capped_rates_with_mean(torch.tensor([1.0, 0.5, 0.5, 0.0]), 0.5, 0.95),
        torch.tensor([0.95, 0.525, 0.525, 0.0]),
    )
    for weights in (torch.rand(50), torch.rand(50) ** 8, torch.tensor([1.0] + [0.01] * 9)):
        for p in (0.1, 0.5, 0.8):
            rates = capped_rates_with_mean(weights, p, 0.95)
            torch.testing.assert_close(rates.mean(), torch.tensor(p))
            assert rates.min() >= 0 and rates.max() <= 0.95 + 1e-6
            order = weights.argsort()
            assert (rates[order].diff() >= -1e-6).all()
    capped = capped_rates_with_mean(torch.tensor([1.0] + [0.01] * 9), 0.5, 0.95)
    assert capped[0] == 0.95  # the cap was active and the rest was scaled up to compensate
    # out of reach: only one positive weight, it gets the cap and the mean falls short
    torch.testing.assert_close(
        capped_rates_with_mean(torch.tensor([1.0, 0.0]), 0.5, 0.95), torch.tensor([0.95, 0.0])
    )
    torch.testing.assert_close(
        capped_rates_with_mean(torch.zeros(3), 0.3, 0.9), torch.full((3,), 0.3)
    )


def test_relevance_from_gradient_times_input_drives_the_rates():
    layer = RelevanceDropout(p=0.4, refresh_every=1)
    features = torch.tensor([2.0, 1.0, 0.5, 3.0, 1.0, 0.25]).repeat(64, 1).requires_grad_()
    output_grad = torch.tensor([3.0, 5.0, 8.0, 1.0, 2.0, 4.0])
    (layer(features) * output_grad).sum().backward()
    # |grad * x| = [6, 5, 4, 3, 2, 1]
    importance = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    torch.testing.assert_close(layer.relevance, importance / 6.0)
    expected_rates = capped_rates_with_mean(1.0 - importance / 6.0, 0.4, 0.95)
    torch.testing.assert_close(layer.drop_rates, expected_rates)
    torch.testing.assert_close(layer.drop_rates.mean(), torch.tensor(0.4))
    assert (layer.drop_rates.diff() > 0).all()  # more relevant, dropped less
    layer.refresh_every = 10**6  # keep these rates for the sampling check
    x = torch.rand(20000, 6) + 0.5
    with torch.no_grad():
        y = layer(x)
    dropped = (y == 0).float().mean(0)
    for observed, rate in zip(dropped.tolist(), expected_rates.tolist()):
        assert_fraction(observed, 20000, rate, what="relevance drop rate")
    scale = 1.0 / (1.0 - expected_rates)
    kept = y != 0
    torch.testing.assert_close(y[kept], (x * scale)[kept])


def test_lrp_epsilon_redistributes_through_the_next_layer():
    weight = torch.tensor([[3.0, -6.0, 1.5, 0.5]])
    next_layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        next_layer.weight.copy_(weight)
    layer = RelevanceDropout(p=0.3, refresh_every=1, method="lrp_epsilon", next_layer=next_layer)
    x = torch.ones(32, 4, requires_grad=True)
    next_layer(layer(x)).sum().backward()
    # one output and x = 1: R_i = W_i * (per-row factor), so relevance is |W_i| / max |W|
    torch.testing.assert_close(layer.relevance, weight.abs()[0] / 6.0)
    torch.testing.assert_close(layer.drop_rates.mean(), torch.tensor(0.3))


def test_lrp_epsilon_with_small_eps_matches_gradient_times_input():
    relevances = []
    for method in ("grad_x_input", "lrp_epsilon"):
        torch.manual_seed(0)
        hidden, head = nn.Linear(5, 8), nn.Linear(8, 3)
        next_layer = head if method == "lrp_epsilon" else None
        layer = RelevanceDropout(p=0.3, refresh_every=1, method=method, next_layer=next_layer)
        model = nn.Sequential(hidden, nn.ReLU(), layer, head)
        model(torch.randn(64, 5)).pow(2).sum().backward()
        relevances.append(layer.relevance)
    torch.testing.assert_close(relevances[0], relevances[1], rtol=1e-4, atol=1e-5)
    assert relevances[0].min() < 0.9  # not a uniform vector


def test_lrp_epsilon_damps_outputs_near_zero():
    next_layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        next_layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    layer = RelevanceDropout(
        p=0.1, p_max=0.2, refresh_every=1, method="lrp_epsilon", next_layer=next_layer, eps=1.0
    )
    x = torch.tensor([[3.0, 0.5]], requires_grad=True)
    layer.relevance, layer.drop_rates = torch.ones(2), torch.zeros(2)  # keep both: z = x
    next_layer(layer(x)).sum().backward()
    # gradient x input alone would give [3, 0.5] -> [1, 1/6]; eps=1 damps by |z| / (|z| + 1)
    expected = torch.tensor([3.0 * 3 / 4, 0.5 * 0.5 / 1.5])
    torch.testing.assert_close(layer.relevance, expected / expected.max())


def test_relevance_refreshes_exactly_every_k_steps_and_is_uniform_before():
    layer = RelevanceDropout(p=0.3, refresh_every=3)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), layer, nn.Linear(8, 1))
    history = []
    for _ in range(7):
        model(torch.randn(32, 5)).pow(2).mean().backward()
        history.append(layer.drop_rates.clone())
    assert layer.steps.item() == 7
    for step in (1, 2):
        assert torch.equal(history[step - 1], torch.full((8,), 0.3))
    changed = [
        step for step in range(2, 8) if not torch.equal(history[step - 1], history[step - 2])
    ]
    assert changed == [3, 6]
    assert not layer.relevance.requires_grad and layer.relevance.grad_fn is None
    assert not layer.drop_rates.requires_grad and layer.drop_rates.grad_fn is None


def test_relevance_state_dict_round_trip():
    layer = RelevanceDropout(p=0.3, refresh_every=2)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), layer, nn.Linear(8, 1))
    for _ in range(5):
        model(torch.randn(32, 5)).pow(2).mean().backward()
    state = layer.state_dict()
    assert set(state) == {"steps", "relevance", "drop_rates"} and state["steps"].item() == 5
    restored = RelevanceDropout(p=0.3, refresh_every=2)
    restored.load_state_dict(state)
    for name, value in state.items():
        assert torch.equal(restored.state_dict()[name], value)
    x = torch.randn(16, 8)
    torch.manual_seed(1)
    expected = layer(x)
    torch.manual_seed(1)
    assert torch.equal(restored(x), expected)


def test_relevance_edge_parameters():
    x = torch.randn(16, 4, requires_grad=True)
    assert RelevanceDropout(p=0.0)(x) is x
    everything = RelevanceDropout(p=1.0, p_max=1.0, refresh_every=1)
    out = everything(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(everything.drop_rates).all() and torch.isfinite(x.grad).all()
    no_signal = RelevanceDropout(p=0.3, refresh_every=1)
    (no_signal(x) * 0.0).sum().backward()  # zero gradient: no relevance information
    torch.testing.assert_close(no_signal.drop_rates, torch.full((4,), 0.3))
    with pytest.raises(ValueError, match="input"):
        no_signal(torch.randn(16, 5))


# ---------------------------------------------------------------- all three


def hidden_input() -> torch.Tensor:
    return torch.relu(torch.randn(32, 3))


LAYERS = {
    "standout": lambda: make_standout(),
    "jumpout": lambda: Jumpout(),
    "jumpout_per_sample": lambda: Jumpout(per_sample=True),
    "jumpout_own_fraction": lambda: Jumpout(per_sample=True, active_fraction="sample"),
    "jumpout_truncated": lambda: Jumpout(sampling="truncated"),
    "relevance": lambda: RelevanceDropout(p=0.5, refresh_every=1),
}


@pytest.mark.parametrize("name", LAYERS)
def test_reproducible_under_manual_seed_and_fresh_masks(name):
    layer = LAYERS[name]()
    x = hidden_input()
    torch.manual_seed(5)
    first = layer(x)
    second = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("name", [name for name in LAYERS if name != "standout"])
def test_identity_at_eval(name):
    layer = LAYERS[name]().eval()
    x = hidden_input()
    assert layer(x) is x
    if isinstance(layer, RelevanceDropout):
        assert layer.steps.item() == 0  # eval passes do not count as training steps


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: Standout(nn.Conv2d(3, 4, 3)), "module"),
        (lambda: Standout(nn.Linear(3, 4), alpha=math.nan), "alpha"),
        (lambda: Standout(nn.Linear(3, 4), beta="1"), "beta"),
        (lambda: Jumpout(p_min=0.5, p_max=0.2), "p_min"),
        (lambda: Jumpout(p_max=1.5), "p_max"),
        (lambda: Jumpout(p_min=-0.1), "p_min"),
        (lambda: Jumpout(sigma=0.0), "sigma"),
        (lambda: Jumpout(sampling="clipped"), "sampling"),
        (lambda: Jumpout(per_sample=1), "per_sample"),
        (lambda: Jumpout(active_fraction="layer"), "active_fraction"),
        (lambda: Jumpout(record_rates="yes"), "record_rates"),
        (lambda: RelevanceDropout(p=1.5), "p"),
        (lambda: RelevanceDropout(p=-0.1), "p"),
        (lambda: RelevanceDropout(p=0.9, p_max=0.5), "p"),
        (lambda: RelevanceDropout(refresh_every=0), "refresh_every"),
        (lambda: RelevanceDropout(refresh_every=2.5), "refresh_every"),
        (lambda: RelevanceDropout(method="saliency"), "method"),
        (lambda: RelevanceDropout(method="lrp_epsilon"), "next_layer"),
        (lambda: RelevanceDropout(next_layer=nn.Linear(2, 2)), "next_layer"),
        (lambda: RelevanceDropout(eps=0.0), "eps"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(build, argument):
    with pytest.raises(ValueError, match=rf"^{argument} "):
        build()


def test_extra_repr():
    assert repr(make_standout()).startswith("Standout(\n  alpha=2.0, beta=-0.5")
    assert repr(Jumpout()) == (
        "Jumpout(p_min=0.01, p_max=0.6, sigma=0.3, sampling='algorithm1', per_sample=False, "
        "active_fraction='batch')"
    )
    assert repr(RelevanceDropout(p=0.2, refresh_every=5)) == (
        "RelevanceDropout(p=0.2, p_max=0.95, refresh_every=5, method='grad_x_input', eps=1e-06)"
    )


def adaptive_mlp() -> nn.Sequential:
    return nn.Sequential(
        Standout(nn.Linear(6, 16)),
        Jumpout(per_sample=True),
        nn.Linear(16, 16),
        nn.ReLU(),
        RelevanceDropout(p=0.3, refresh_every=1),
        nn.Linear(16, 1),
    )


def test_torch_compile_smoke():
    model = adaptive_mlp()
    compiled = torch.compile(model)
    for _ in range(2):
        out = compiled(torch.randn(8, 6))
        out.sum().backward()
    assert out.shape == (8, 1) and torch.isfinite(out).all()
    relevance_layer = model[4]
    assert relevance_layer.steps.item() == 2
    torch.testing.assert_close(relevance_layer.drop_rates.mean(), torch.tensor(0.3))
    assert relevance_layer.drop_rates.std() > 0  # refreshed from a real gradient
    model.eval()
    torch.testing.assert_close(compiled(torch.ones(4, 6)), model(torch.ones(4, 6)))


def test_bf16_autocast_forward():
    model = adaptive_mlp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(8, 6))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(model[0].module.weight.grad).all()
    torch.testing.assert_close(model[4].drop_rates.mean(), torch.tensor(0.3))


TRAINING_MODELS = {
    "standout": lambda: nn.Sequential(Standout(nn.Linear(8, 32)), nn.Linear(32, 1)),
    "jumpout": lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), Jumpout(), nn.Linear(32, 1)),
    "relevance": lambda: nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), RelevanceDropout(p=0.2, refresh_every=10), nn.Linear(32, 1)
    ),
}


@pytest.mark.parametrize("name", TRAINING_MODELS)
def test_tiny_training_loss_falls(name):
    inputs = torch.randn(128, 8)
    targets = torch.sin(inputs @ torch.randn(8, 1))
    model = TRAINING_MODELS[name]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = nn.functional.mse_loss(model(inputs), targets).item()
        model.train()
        return loss

    before = eval_loss()
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    assert eval_loss() < 0.5 * before
