"""Variational, sparse variational and concrete dropout: distributions, regularisers, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, special
from scipy import stats as scipy_stats
from stats import Z, assert_fraction, assert_mean
from torch import nn

from autodropout.layers import (
    ConcreteDropout,
    DropoutLayer,
    SparseVariationalDropout,
    VariationalDropout,
    variational_kl,
)

# Two-sided tail of a z = 6 normal: the false-failure rate every statistical check here uses.
TAIL = scipy_stats.norm.sf(Z)


def assert_gaussian_samples(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Each coordinate of ``samples`` (n draws along dim 0) is N(mean, var): mean and chi-square."""
    n = samples.shape[0]
    samples = samples.double().flatten(1)
    sample_mean, sample_var = samples.mean(0), samples.var(0)
    low, high = scipy_stats.chi2.ppf(TAIL, n - 1), scipy_stats.chi2.isf(TAIL, n - 1)
    for observed, observed_var, mu, sigma2 in zip(
        sample_mean.tolist(), sample_var.tolist(), mean.flatten().tolist(), var.flatten().tolist()
    ):
        assert_mean(observed, mu, math.sqrt(sigma2), n)
        statistic = (n - 1) * observed_var / sigma2
        assert low <= statistic <= high, f"variance {observed_var:.5f} vs {sigma2:.5f} (n={n})"


def conv_sum_of_squares(x2: torch.Tensor, w2: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """sum over a receptive field of x2 * w2, written with unfold (one image, any groups)."""
    groups, out_per_group = conv.groups, conv.out_channels // conv.groups
    in_per_group = conv.in_channels // groups
    h_out = x2.shape[-2] + 2 * conv.padding[0] - conv.kernel_size[0] + 1
    outputs = []
    for g in range(groups):
        patches = F.unfold(
            x2[:, g * in_per_group : (g + 1) * in_per_group], conv.kernel_size, padding=conv.padding
        )
        rows = w2[g * out_per_group : (g + 1) * out_per_group].flatten(1)
        outputs.append(rows @ patches[0])
    return torch.cat(outputs).reshape(1, conv.out_channels, h_out, -1)


# ----------------------------------------------------------------------------- VariationalDropout


@pytest.mark.parametrize("granularity", ["layer", "unit"])
def test_variational_linear_samples_match_local_reparameterisation(granularity):
    layer = VariationalDropout(nn.Linear(6, 3), p=0.3, granularity=granularity)
    with torch.no_grad():
        layer.log_alpha.uniform_(-2.0, 0.0)
    x = torch.randn(1, 6)
    n = 20_000
    with torch.no_grad():
        samples = layer(x.expand(n, 6))
        alpha = layer.log_alpha.exp().expand(6)
        w = layer.module.weight
        expected_var = torch.stack(
            [sum(alpha[i] * x[0, i] ** 2 * w[j, i] ** 2 for i in range(6)) for j in range(3)]
        )
    assert_gaussian_samples(samples, layer.module(x)[0].detach(), expected_var)


@pytest.mark.parametrize("granularity", ["layer", "unit"])
def test_variational_conv_samples_match_local_reparameterisation(granularity):
    conv = nn.Conv2d(4, 2, 3, padding=1, groups=2)
    layer = VariationalDropout(conv, p=0.2, granularity=granularity)
    assert layer.log_alpha.shape == ((4, 1, 1) if granularity == "unit" else ())
    with torch.no_grad():
        layer.log_alpha.uniform_(-2.0, 0.0)
    x = torch.randn(1, 4, 4, 4)
    n = 3_000
    with torch.no_grad():
        samples = layer(x.expand(n, -1, -1, -1))
        x2 = x**2 * layer.log_alpha.exp().expand(4, 1, 1)
        expected_var = conv_sum_of_squares(x2, conv.weight**2, conv)
    assert_gaussian_samples(samples, conv(x).detach(), expected_var)


@pytest.mark.parametrize("module", [nn.Linear(5, 3), nn.Conv2d(3, 4, 3, padding=1)])
def test_variational_eval_is_the_wrapped_module_exactly(module):
    layer = VariationalDropout(module, p=0.4).eval()
    x = torch.randn(2, 5) if isinstance(module, nn.Linear) else torch.randn(2, 3, 6, 6)
    assert torch.equal(layer(x), module(x))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_variational_gradient_reaches_log_alpha(p):
    layer = VariationalDropout(nn.Linear(5, 3), p=p)
    loss = layer(torch.randn(8, 5)).pow(2).sum() + layer.kl()
    loss.backward()
    grad = layer.log_alpha.grad
    assert torch.isfinite(grad).all() and (grad != 0).all()


def paper_kl_per_weight(alpha: float) -> float:
    """Kingma et al. (2015), eq. for -KL with c1, c2, c3 (constant dropped), alpha <= 1."""
    c1, c2, c3 = 1.16145124, -1.50204118, 0.58629921
    return -(0.5 * math.log(alpha) + c1 * alpha + c2 * alpha**2 + c3 * alpha**3)


@pytest.mark.parametrize("alpha", [0.01, 0.3, 1.0])
def test_variational_kl_matches_paper_formula_per_layer(alpha):
    layer = VariationalDropout(nn.Linear(4, 3), p=0.5, granularity="layer")
    with torch.no_grad():
        layer.log_alpha.fill_(math.log(alpha))
    assert layer.kl().item() == pytest.approx(12 * paper_kl_per_weight(alpha), rel=1e-5)


def test_variational_kl_per_unit_sums_over_the_weights_of_each_unit():
    layer = VariationalDropout(nn.Conv2d(3, 2, 3), p=0.5, granularity="unit")
    alphas = [0.05, 0.5, 1.0]
    with torch.no_grad():
        layer.log_alpha.copy_(torch.tensor(alphas).log().view(3, 1, 1))
    weights_per_channel = 2 * 3 * 3
    expected = weights_per_channel * sum(paper_kl_per_weight(a) for a in alphas)
    assert layer.kl().item() == pytest.approx(expected, rel=1e-5)


def test_variational_alpha_is_clamped_to_one():
    layer = VariationalDropout(nn.Linear(4, 3), p=0.5, granularity="layer")
    at_one = layer.kl().item()
    x = torch.randn(4000, 4)
    torch.manual_seed(1)
    out_at_one = layer(x)
    with torch.no_grad():
        layer.log_alpha.fill_(math.log(4.0))
    torch.manual_seed(1)
    assert torch.equal(layer(x), out_at_one)
    assert layer.kl().item() == pytest.approx(at_one, rel=1e-6)


@pytest.mark.parametrize("p", [1e-6, 0.5])
def test_variational_edge_initial_rates_stay_finite(p):
    layer = VariationalDropout(nn.Linear(4, 3), p=p)
    loss = layer(torch.randn(6, 4)).sum() + layer.kl()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(param.grad).all() for param in layer.parameters())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"module": nn.ReLU()}, "module"),
        ({"module": nn.Conv1d(2, 2, 3)}, "module"),
        ({"module": nn.LazyLinear(3)}, "module"),
        ({"module": nn.Linear(2, 2), "p": 0.0}, "p"),
        ({"module": nn.Linear(2, 2), "p": 0.6}, "p"),
        ({"module": nn.Linear(2, 2), "p": 1.0}, "p"),
        ({"module": nn.Linear(2, 2), "p": -0.1}, "p"),
        ({"module": nn.Linear(2, 2), "granularity": "weight"}, "granularity"),
    ],
)
def test_variational_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VariationalDropout(**kwargs)


# ----------------------------------------------------------------------- SparseVariationalDropout

EULER_LOG2 = (np.euler_gamma + math.log(2.0)) / 2  # -E[log|z|] for z ~ N(0, 1)


def true_negative_kl(log_alpha: float) -> float:
    """-KL(N(theta, alpha theta^2) || log-uniform) = 0.5 log alpha - E log|eps| + C.

    Here eps ~ N(1, alpha) is the multiplicative noise.

    E log|eps| is integrated numerically over eps = 1 + sqrt(alpha) z, split at the log
    singularity eps = 0. C = -EULER_LOG2 makes -KL -> 0 as alpha -> infinity, the limit the
    approximation is built to have (its C = -k1).
    """
    s = math.exp(log_alpha / 2)

    def integrand(z):
        return math.log(abs(1.0 + s * z)) * scipy_stats.norm.pdf(z)

    below, _ = integrate.quad(integrand, -np.inf, -1.0 / s, limit=200)
    above, _ = integrate.quad(integrand, -1.0 / s, np.inf, limit=200)
    return 0.5 * log_alpha - (below + above) - EULER_LOG2


# Eq. (14) of Molchanov et al. is a 3-parameter fit of a curve whose range is k1 ~= 0.64 nats; we
# require it to be within 0.01 nats (about 1.6 % of that range) of the exact integral everywhere.
KL_APPROXIMATION_BOUND = 0.01


@pytest.mark.parametrize("log_alpha", [-8.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 8.0])
def test_sparse_kl_approximation_matches_numerical_integral(log_alpha):
    layer = SparseVariationalDropout(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        layer.module.weight.fill_(1.0)
        layer.log_sigma2.fill_(log_alpha)
    approximate = -layer.kl().item()
    assert abs(approximate - true_negative_kl(log_alpha)) <= KL_APPROXIMATION_BOUND


@pytest.mark.parametrize("module", [nn.Linear(4, 3), nn.Conv2d(2, 3, 3, padding=1)])
def test_sparse_eval_zeroes_weights_above_threshold(module):
    layer = SparseVariationalDropout(module, threshold=3.0)
    dropped = torch.rand_like(module.weight) < 0.4
    with torch.no_grad():
        log_w2 = torch.log(module.weight**2)
        layer.log_sigma2.copy_(log_w2 + torch.where(dropped, 5.0, -5.0))
    x = torch.randn(2, 4) if isinstance(module, nn.Linear) else torch.randn(2, 2, 5, 5)
    masked = nn.Parameter(module.weight.masked_fill(dropped, 0.0))
    expected = (
        F.linear(x, masked, module.bias)
        if isinstance(module, nn.Linear)
        else F.conv2d(x, masked, module.bias, padding=1)
    )
    torch.testing.assert_close(layer.eval()(x), expected)
    assert layer.sparsity() == pytest.approx(dropped.float().mean().item(), abs=1e-7)
    assert isinstance(layer.sparsity(), float)


@pytest.mark.parametrize("module", [nn.Linear(5, 3), nn.Conv2d(2, 3, 3, padding=1)])
def test_sparse_training_samples_match_local_reparameterisation(module):
    layer = SparseVariationalDropout(module)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-3.0, 0.0)
    sigma2 = layer.log_sigma2.detach().exp()
    if isinstance(module, nn.Linear):
        x, n = torch.randn(1, 5), 20_000
        expected_var = (x**2 @ sigma2.T)[0]
    else:
        x, n = torch.randn(1, 2, 4, 4), 3_000
        expected_var = conv_sum_of_squares(x**2, sigma2, module)
    with torch.no_grad():
        samples = layer(x.expand(n, *x.shape[1:]))
        mean = module(x)[0]
    assert_gaussian_samples(samples, mean, expected_var)


def test_sparse_gradients_reach_weight_and_log_sigma2():
    layer = SparseVariationalDropout(nn.Linear(5, 3))
    (layer(torch.randn(8, 5)).pow(2).sum() + layer.kl()).backward()
    for grad in (layer.log_sigma2.grad, layer.module.weight.grad):
        assert torch.isfinite(grad).all() and (grad != 0).all()


def test_sparse_zero_weight_stays_finite():
    layer = SparseVariationalDropout(nn.Linear(3, 2))
    with torch.no_grad():
        layer.module.weight.zero_()
    loss = layer(torch.randn(4, 3)).sum() + layer.kl()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(layer.log_sigma2.grad).all()
    assert layer.sparsity() == 1.0
    assert torch.isfinite(layer.eval()(torch.randn(4, 3))).all()


def test_sparse_kl_drives_noise_inputs_sparse():
    n = 64
    x = torch.randn(n, 10)
    y = x[:, :2] @ torch.tensor([[2.0], [-3.0]]) + 0.1 * torch.randn(n, 1)  # inputs 2..9: noise
    layer = SparseVariationalDropout(nn.Linear(10, 1))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(400):
        loss = F.mse_loss(layer(x), y) + variational_kl(layer) / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pruned = (layer.log_alpha() > layer.threshold)[0]
    assert not pruned[:2].any(), "a relevant input was pruned"
    assert layer.sparsity() >= 0.3, f"only {pruned.sum().item()} of 8 noise inputs pruned"
    assert F.mse_loss(layer.eval()(x), y).item() < 0.1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"module": nn.Sequential()}, "module"),
        ({"module": None}, "module"),
        ({"module": nn.Linear(2, 2), "threshold": "3"}, "threshold"),
        ({"module": nn.Linear(2, 2), "threshold": float("nan")}, "threshold"),
    ],
)
def test_sparse_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SparseVariationalDropout(**kwargs)


# -------------------------------------------------------------------------------- ConcreteDropout


def fraction_not_binary(p: float, temperature: float, tolerance: float) -> float:
    """P(a scaled keep entry is farther than ``tolerance`` from both 0 and 1/(1-p)).

    The drop indicator is z = sigmoid((logit p + L) / t), L standard logistic. The entry is within
    ``tolerance`` of a binary value iff z <= d or z >= 1 - d with d = tolerance * (1 - p), that is
    iff |logit p + L| >= t * logit(1 - d): an exact logistic-CDF difference.
    """
    edge = temperature * special.logit(1.0 - tolerance * (1.0 - p))
    return special.expit(edge - special.logit(p)) - special.expit(-edge - special.logit(p))


def concrete_mask(layer: ConcreteDropout, n: int) -> torch.Tensor:
    with torch.no_grad():
        return layer(torch.ones(n))


def test_concrete_masks_binarise_as_temperature_falls():
    p, n, tolerance = 0.3, 20_000, 1e-3
    binary_fractions = []
    for temperature in (0.5, 0.1, 0.01, 0.001):
        mask = concrete_mask(ConcreteDropout(p=p, temperature=temperature), n)
        near_zero = mask.abs() <= tolerance
        near_scale = (mask - 1.0 / (1.0 - p)).abs() <= tolerance
        observed = (near_zero | near_scale).float().mean().item()
        assert_fraction(observed, n, 1.0 - fraction_not_binary(p, temperature, tolerance))
        binary_fractions.append(observed)
    assert binary_fractions == sorted(binary_fractions)
    assert binary_fractions[-1] > 0.99


def test_concrete_kept_fraction_is_one_minus_p():
    p, temperature, n = 0.3, 0.1, 40_000
    keep = concrete_mask(ConcreteDropout(p=p, temperature=temperature), n) * (1.0 - p)
    # P(1 - z > 0.5) = P(logit p + L < 0) = 1 - p exactly, at any temperature.
    assert_fraction((keep > 0.5).float().mean().item(), n, 1.0 - p, what="kept fraction")

    def moment(k):
        def integrand(noise):
            return special.expit(-(special.logit(p) + noise) / temperature) ** k * (
                scipy_stats.logistic.pdf(noise)
            )

        centre = -special.logit(p)  # the sigmoid's step: split the integral there
        halves = ((-np.inf, centre), (centre, np.inf))
        return sum(integrate.quad(integrand, lo, hi)[0] for lo, hi in halves)

    mean, second = moment(1), moment(2)
    assert_mean(keep.mean().item(), mean, math.sqrt(second - mean**2), n, what="relaxed keep")
    assert abs(mean - (1.0 - p)) < 0.01  # the relaxation barely biases the kept fraction


def test_concrete_drop_probability_is_learned():
    layer = ConcreteDropout(nn.Linear(5, 2), p=0.2)
    layer(torch.randn(8, 5)).pow(2).sum().backward()
    assert torch.isfinite(layer.p_logit.grad) and layer.p_logit.grad != 0
    assert layer.p_learned == pytest.approx(0.2, rel=1e-6)


def test_concrete_regularization_matches_formula_with_module():
    wr, dr, p = 1e-2, 1e-1, 0.2
    layer = ConcreteDropout(nn.Linear(5, 3), p=p, weight_regularizer=wr, dropout_regularizer=dr)
    with pytest.raises(RuntimeError, match="forward"):
        layer.regularization()
    layer(torch.randn(4, 5))
    squared = (layer.module.weight**2).sum().item() + (layer.module.bias**2).sum().item()
    neg_entropy = p * math.log(p) + (1 - p) * math.log(1 - p)
    expected = wr * squared / (1 - p) + dr * 5 * neg_entropy
    assert layer.regularization().item() == pytest.approx(expected, rel=1e-5)


def test_concrete_regularization_without_module_pushes_p_towards_half():
    layer = ConcreteDropout(p=0.2, dropout_regularizer=1e-1)
    layer(torch.randn(4, 3, 4))
    neg_entropy = 0.2 * math.log(0.2) + 0.8 * math.log(0.8)
    reg = layer.regularization()
    assert reg.item() == pytest.approx(1e-1 * 12 * neg_entropy, rel=1e-5)
    reg.backward()
    assert layer.p_logit.grad < 0  # a descent step raises p towards 0.5


def test_concrete_eval_applies_module_to_the_untouched_input():
    x = torch.randn(3, 5)
    assert torch.equal(ConcreteDropout(p=0.5).eval()(x), x)
    linear = nn.Linear(5, 2)
    assert torch.equal(ConcreteDropout(linear, p=0.5).eval()(x), linear(x))


@pytest.mark.parametrize("p", [1e-6, 1.0 - 1e-6])
def test_concrete_edge_initial_rates_stay_finite(p):
    layer = ConcreteDropout(nn.Linear(4, 2), p=p)
    loss = layer(torch.randn(6, 4)).sum() + layer.regularization()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(param.grad).all() for param in layer.parameters())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"module": 0.2}, "module"),
        ({"p": 0.0}, "p"),
        ({"p": 1.0}, "p"),
        ({"p": 1.5}, "p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"weight_regularizer": -1.0}, "weight_regularizer"),
        ({"dropout_regularizer": float("nan")}, "dropout_regularizer"),
    ],
)
def test_concrete_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ConcreteDropout(**kwargs)


# ------------------------------------------------------------------------------- all three layers

LAYER_FACTORIES = {
    "variational": lambda: VariationalDropout(nn.Linear(4, 1), p=0.3),
    "sparse": lambda: SparseVariationalDropout(nn.Linear(4, 1)),
    "concrete": lambda: ConcreteDropout(nn.Linear(4, 1), p=0.2),
}


@pytest.mark.parametrize("name", LAYER_FACTORIES)
def test_layer_is_reproducible_and_resamples_each_call(name):
    layer = LAYER_FACTORIES[name]()
    assert isinstance(layer, DropoutLayer)
    x = torch.randn(16, 4)
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)


@pytest.mark.parametrize("name", LAYER_FACTORIES)
def test_layer_trains_on_a_tiny_regression(name):
    n = 128
    x = torch.randn(n, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1)
    layer = LAYER_FACTORIES[name]()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)

    def eval_loss():
        with torch.no_grad():
            return F.mse_loss(layer.eval()(x), y).item()

    initial = eval_loss()
    for _ in range(150):
        layer.train()
        loss = F.mse_loss(layer(x), y) + variational_kl(layer) / n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < 0.1 * initial


def test_variational_kl_sums_every_learned_rate_layer():
    model = nn.Sequential(
        VariationalDropout(nn.Linear(4, 4), p=0.3),
        nn.Sequential(SparseVariationalDropout(nn.Linear(4, 4)), nn.ReLU()),
        ConcreteDropout(nn.Linear(4, 2), p=0.2),
    )
    model(torch.randn(3, 4))
    expected = model[0].kl() + model[1][0].kl() + model[2].regularization()
    torch.testing.assert_close(variational_kl(model), expected)
    assert variational_kl(nn.Linear(2, 2)).item() == 0.0
    assert variational_kl(nn.ReLU()).shape == ()


def test_extra_repr_names_the_settings():
    assert "init_p=0.3, granularity='unit'" in repr(VariationalDropout(nn.Linear(2, 2), p=0.3))
    assert "threshold=2.5" in repr(SparseVariationalDropout(nn.Linear(2, 2), threshold=2.5))
    assert "init_p=0.1, temperature=0.1" in repr(ConcreteDropout())


def stack() -> nn.Sequential:
    return nn.Sequential(
        VariationalDropout(nn.Linear(8, 8), p=0.3),
        nn.ReLU(),
        SparseVariationalDropout(nn.Linear(8, 8)),
        ConcreteDropout(nn.Linear(8, 4), p=0.2),
    )


def test_torch_compile_trains_the_stack_without_graph_breaks():
    # aot_eager: full Dynamo capture and AOT autograd without Inductor's slow CPU code generation.
    model = stack()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(torch.randn(5, 8))
    assert out.shape == (5, 4) and torch.isfinite(out).all()
    (out.pow(2).mean() + variational_kl(model)).backward()
    for param in (model[0].log_alpha, model[2].log_sigma2, model[3].p_logit):
        assert torch.isfinite(param.grad).all() and (param.grad != 0).any()


def test_bf16_autocast_forward():
    model = stack()
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_out = model(x)
        eval_out = model.eval()(x)
    assert train_out.dtype == eval_out.dtype == torch.bfloat16
    assert torch.isfinite(train_out).all() and torch.isfinite(eval_out).all()


def test_concrete_monte_carlo_sampling_keeps_the_recorded_input_size():
    layer = ConcreteDropout(p=0.2)
    layer(torch.randn(2, 3))
    layer.mc_sampling = True
    x = torch.randn(2, 7)
    first = layer(x)
    assert layer.input_dim == 3
    assert not torch.equal(first, layer(x))  # still a fresh random mask while sampling
