"""Standout, Jumpout and RelevanceDropout: rates, rescaling, refresh, eval, training."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as scipy_stats
from stats import Z, assert_fraction
from torch import nn

from autodropout.layers import Jumpout, RelevanceDropout, Standout
from autodropout.layers.adaptive import capped_rates_with_mean

KS_ALPHA = 1e-6



def truncated_half_normal(p_min: float, p_max: float, sigma: float):
    return scipy_stats.truncnorm(p_min / sigma, p_max / sigma, loc=0.0, scale=sigma)


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


@pytest.mark.parametrize(("p_min", "p_max", "sigma"), [(0.01, 0.6, None), (0.05, 0.5, 0.1)])
def test_jumpout_sampled_rates_follow_the_truncated_half_normal(p_min, p_max, sigma):
    layer = Jumpout(p_min=p_min, p_max=p_max, sigma=sigma)
    rates = layer.sample_rates(20000)
    assert rates.dtype == torch.float32 and rates.min() >= p_min and rates.max() <= p_max
    reference = truncated_half_normal(p_min, p_max, layer.sigma)
    assert scipy_stats.kstest(rates.numpy(), reference.cdf).pvalue > KS_ALPHA
    # the density decreases: far more mass in the lower than in the upper half of the range
    middle = (p_min + p_max) / 2
    assert (rates < middle).float().mean() > 0.6


def test_jumpout_forward_draws_rates_from_the_truncated_half_normal():
    per_sample = Jumpout(per_sample=True, record_rates=True)
    per_sample(binary_relu_input(20000, 8, 0.5))
    assert per_sample.last_rates.shape == (20000,)
    reference = truncated_half_normal(0.01, 0.6, per_sample.sigma)
    assert scipy_stats.kstest(per_sample.last_rates.numpy(), reference.cdf).pvalue > KS_ALPHA
    per_batch = Jumpout(record_rates=True)
    rates = []
    for _ in range(400):
        per_batch(binary_relu_input(2, 8, 0.5))
        rates.append(per_batch.last_rates)
    assert per_batch.last_rates.shape == (1,)
    assert scipy_stats.kstest(torch.cat(rates).numpy(), reference.cdf).pvalue > KS_ALPHA
    assert Jumpout().last_rates is None


def test_jumpout_rate_among_active_units_is_normalised_by_the_active_fraction():
    layer = Jumpout(p_min=0.05, p_max=0.6, sigma=0.2, record_rates=True)
    x = binary_relu_input(200, 100, 0.5)
    active = x > 0
    for _ in range(20):
        y = layer(x)
        rate = layer.last_rates.item()
        active_rate = min(rate / 0.5, layer.p_max)
        dropped = (y[active] == 0).float()
        assert_fraction(dropped.mean().item(), dropped.numel(), active_rate, what="active drop")
        assert torch.equal(y[~active], torch.zeros_like(y[~active]))
        scale = (1.0 - active_rate) ** -0.75
        survivors = y[active] != 0
        torch.testing.assert_close(y[active][survivors], x[active][survivors] * scale)


def test_jumpout_per_sample_normalises_each_sample_by_its_own_active_fraction():
    layer = Jumpout(p_min=0.01, p_max=0.6, sigma=0.3, per_sample=True, record_rates=True)
    fractions = (0.25, 0.5, 1.0)
    x = torch.cat([binary_relu_input(1000, 40, fraction) for fraction in fractions])
    y = layer(x)
    rates = layer.last_rates
    for group, fraction in enumerate(fractions):
        rows = slice(group * 1000, (group + 1) * 1000)
        active_rates = (rates[rows] / fraction).clamp(max=layer.p_max)
        active = x[rows] > 0
        dropped = ((y[rows] == 0) & active).sum(1).float()
        actives = active.sum(1).float()
        expected = (actives * active_rates).sum()
        std = (actives * active_rates * (1 - active_rates)).sum().sqrt()
        assert abs(dropped.sum() - expected) <= Z * std, f"active fraction {fraction}"
        scale = (1.0 - active_rates).pow(-0.75).unsqueeze(1).expand_as(x[rows])
        survivors = y[rows] != 0
        torch.testing.assert_close(y[rows][survivors], (x[rows] * scale)[survivors])
        assert torch.equal(y[rows][~active], torch.zeros_like(y[rows][~active]))


def test_jumpout_edge_parameters():
    x = binary_relu_input(64, 16, 0.5)
    assert torch.equal(Jumpout(p_min=0.0, p_max=0.0)(x), x)
    assert torch.equal(Jumpout(p_min=1.0, p_max=1.0)(x), torch.zeros_like(x))
    tiny_sigma = Jumpout(p_min=0.2, p_max=0.6, sigma=1e-9)
    assert torch.equal(tiny_sigma.sample_rates(100), torch.full((100,), 0.2))
    huge_sigma = Jumpout(sigma=1e9).sample_rates(1000)
    assert torch.isfinite(huge_sigma).all() and huge_sigma.min() >= 0.01
    for per_sample in (False, True):
        layer = Jumpout(per_sample=per_sample)
        assert torch.equal(layer(torch.zeros(8, 16)), torch.zeros(8, 16))
        assert torch.isfinite(layer(x)).all()


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


@pytest.mark.parametrize("name", ["jumpout", "jumpout_per_sample", "relevance"])
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
    assert repr(Jumpout()) == "Jumpout(p_min=0.01, p_max=0.6, sigma=0.3, per_sample=False)"
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
