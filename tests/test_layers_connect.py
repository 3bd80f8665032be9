"""DropConnect: weight masks, mean-weight eval, moment-matching MC inference, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from stats import Z, assert_fraction, assert_mean
from torch import nn
from toy_tasks import blobs, eval_loss, stripes

from autodropout.layers.base import DropoutLayer
from autodropout.layers.connect import DropConnect
from autodropout.layers.mc import mc_dropout


def probe(p: float, n_in: int = 300, n_out: int = 200, **kwargs) -> tuple[DropConnect, torch.Tensor]:
    """A bias-free Linear with unit weights fed the identity: the output is the scaled mask."""
    linear = nn.Linear(n_in, n_out, bias=False)
    nn.init.ones_(linear.weight)
    return DropConnect(linear, p, **kwargs), torch.eye(n_in)


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_weight_mask_fraction_and_exact_rescale(p):
    layer, x = probe(p)
    masked_weight = layer(x).T
    dropped = masked_weight == 0
    assert_fraction(dropped.double().mean().item(), masked_weight.numel(), p)
    kept = masked_weight[~dropped]
    assert torch.equal(kept, torch.full_like(kept, 1.0 / (1.0 - p)))


def test_gradient_uses_the_forward_mask_and_reaches_the_weight():
    layer, x = probe(0.5)
    y = layer(x)
    y.sum().backward()  # d(sum of W * M')/dW = M', the scaled mask that forward used
    assert torch.equal(layer.module.weight.grad, y.detach().T)


def test_bias_is_never_dropped():
    linear = nn.Linear(30, 20)
    nn.init.ones_(linear.bias)
    y = DropConnect(linear, 1.0)(torch.randn(5, 30))
    assert torch.equal(y, torch.ones(5, 20))  # p = 1: every weight dropped, bias kept, no NaN


def test_fresh_mask_per_call_reproducible_under_seed():
    layer, x = probe(0.5, 40, 30)
    torch.manual_seed(3)
    first, second = layer(x), layer(x)
    torch.manual_seed(3)
    assert not torch.equal(first, second)
    assert torch.equal(first, layer(x))


def test_mc_dropout_samples_weight_masks():
    layer, x = probe(0.5, 20, 10)
    with mc_dropout(nn.Sequential(layer).eval()):
        assert not torch.equal(layer(x), layer(x))
    assert torch.equal(layer(x), layer.module(x))


def test_training_output_is_unbiased():
    linear, p, calls = nn.Linear(50, 8), 0.3, 2000
    x = torch.randn(1, 50)
    layer = DropConnect(linear, p)
    with torch.no_grad():
        average = torch.stack([layer(x) for _ in range(calls)]).double().mean(0)[0]
        mean = linear(x)[0]
        std = torch.sqrt(p / (1 - p) * (x**2 @ (linear.weight**2).T))[0]
    for unit in range(8):
        assert_mean(average[unit].item(), mean[unit].item(), std[unit].item(), calls)


@pytest.mark.parametrize(
    "module", [nn.Linear(6, 4), nn.Conv2d(3, 5, 3, padding=1)], ids=["linear", "conv"]
)
def test_eval_equals_the_wrapped_module_exactly(module):
    x = torch.randn(2, 6) if isinstance(module, nn.Linear) else torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert torch.equal(DropConnect(module, 0.5).eval()(x), module(x))
        assert torch.equal(DropConnect(module, 0.5, activation=torch.relu).eval()(x), module(x).relu())
        assert torch.equal(DropConnect(module, 0.0)(x), module(x))  # p = 0 in training


def test_parameters_and_state_dict_are_the_wrapped_modules():
    linear = nn.Linear(4, 3)
    layer = DropConnect(linear, 0.5, mc_samples=10, activation=nn.ReLU())
    assert isinstance(layer, DropoutLayer)
    assert set(layer.state_dict()) == {"module.weight", "module.bias"}
    assert [id(t) for t in layer.parameters()] == [id(linear.weight), id(linear.bias)]
    assert "p=0.5, mc_samples=10" in repr(layer) and "Linear(in_features=4" in repr(layer)
    assert "activation=relu" in repr(DropConnect(linear, activation=torch.relu))


def test_conv2d_training_masks_weights():
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    layer = DropConnect(conv, 0.5)
    x = torch.randn(3, 2, 6, 6, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    grad = conv.weight.grad.clone()
    assert y.shape == conv(x).shape and not torch.equal(y, conv(x))
    # a dropped weight gets no gradient; kept ones do (generic x makes an exact 0 unlikely)
    assert_fraction((grad == 0).double().mean().item(), grad.numel(), 0.5)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"module": nn.Conv1d(2, 2, 3)}, "module"),
        ({"module": nn.ReLU()}, "module"),
        ({"p": -0.1}, "p"),
        ({"p": 1.5}, "p"),
        ({"mc_samples": -1}, "mc_samples"),
        ({"mc_samples": 2.5}, "mc_samples"),
        ({"mc_samples": True}, "mc_samples"),
        ({"p": 1.0, "mc_samples": 8}, "p"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, argument):
    kwargs = {"module": nn.Linear(3, 3), **kwargs}
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        DropConnect(**kwargs)


# --- moment-matching MC inference ----------------------------------------------------------


@torch.no_grad()
def gaussian_moments(module: nn.Module, x: torch.Tensor, p: float) -> tuple[torch.Tensor, ...]:
    """Mean and variance of each pre-activation, computed from scratch in float64."""
    weight, bias = module.weight.double(), module.bias.double()
    if isinstance(module, nn.Linear):
        terms = x.double().unsqueeze(1) * weight  # (N, out, in): term j of unit i
        return terms.sum(-1) + bias, p / (1 - p) * terms.pow(2).sum(-1)
    patches = F.unfold(x.double(), module.kernel_size, padding=module.padding)  # (N, C*k*k, L)
    flat = weight.flatten(1)
    mean = torch.einsum("ok,nkl->nol", flat, patches) + bias.view(1, -1, 1)
    var = p / (1 - p) * torch.einsum("ok,nkl->nol", flat**2, patches**2)
    shape = (x.shape[0], flat.shape[0], x.shape[2], x.shape[3])  # "same" padding, stride 1
    return mean.reshape(shape), var.reshape(shape)


@pytest.mark.parametrize(
    "module", [nn.Linear(40, 6), nn.Conv2d(2, 3, 3, padding=1)], ids=["linear", "conv"]
)
def test_mc_inference_matches_gaussian_second_moment(module):
    """With activation u -> u^2 the MC output estimates E[u^2] = mean^2 + var exactly."""
    p, samples = 0.4, 20_000
    x = torch.randn(2, 40) if isinstance(module, nn.Linear) else torch.randn(2, 2, 4, 4)
    layer = DropConnect(module, p, mc_samples=samples, activation=torch.square).eval()
    with torch.no_grad():
        estimate = layer(x).double()
    mean, var = gaussian_moments(module, x, p)
    # Var(u^2) = 2 var^2 + 4 mean^2 var for Gaussian u
    bound = Z * torch.sqrt(2 * var**2 + 4 * mean**2 * var) / math.sqrt(samples)
    assert ((estimate - (mean**2 + var)).abs() <= bound).all()


def test_mc_inference_matches_closed_form_relu_mean():
    p, samples = 0.5, 20_000
    linear = nn.Linear(64, 16)
    x = torch.randn(3, 64)
    layer = DropConnect(linear, p, mc_samples=samples, activation=torch.relu).eval()
    with torch.no_grad():
        estimate = layer(x).double()
    mean, var = gaussian_moments(linear, x, p)
    std = var.sqrt()
    z = (mean / std).numpy()
    exact = mean * torch.from_numpy(stats.norm.cdf(z)) + std * torch.from_numpy(stats.norm.pdf(z))
    # relu is 1-Lipschitz, so the sd of relu(u) is at most the sd of u
    assert ((estimate - exact).abs() <= Z * std / math.sqrt(samples)).all()


def test_mc_inference_approximates_training_mode_average_of_relu():
    """Eval MC output vs the average over sampled weight masks of relu(x W_masked + b).

    Tolerance: sampling error of both averages (sd of relu(u) <= sd of u), plus the distance
    between the exact pre-activation (a sum of independent terms c_j (m_j/(1-p) - 1)) and its
    Gaussian: for 1-Lipschitz relu, |E relu(U) - E relu(G)| <= W1(U, G) <= sum E|X_j|^3 / var
    (Goldstein 2010), with E|X_j|^3 = |c_j|^3 p (1 + p^2 / (1-p)^2).
    """
    p, n_in, calls, samples = 0.5, 1024, 4000, 20_000
    linear = nn.Linear(n_in, 16)
    x = torch.randn(1, n_in)
    layer = DropConnect(linear, p, mc_samples=samples, activation=torch.relu)
    with torch.no_grad():
        sampled = torch.stack([layer(x) for _ in range(calls)]).double().mean(0)[0]
        mc = layer.eval()(x).double()[0]
        terms = x.double() * linear.weight.double()  # (out, in): c_j of every unit
    mean, var = gaussian_moments(linear, x, p)
    mean, std = mean[0], var[0].sqrt()
    third = terms.abs().pow(3).sum(-1) * p * (1 + p**2 / (1 - p) ** 2)
    tolerance = Z * std * math.sqrt(1 / calls + 1 / samples) + third / var[0]
    assert ((sampled - mc).abs() <= tolerance).all()
    # the check can fail: mean-weight inference relu(E[u]) is outside it for some unit
    assert ((sampled - mean.relu()).abs() > tolerance).any()


def test_mc_inference_identity_activation_is_unbiased():
    linear = nn.Linear(20, 5)
    x = torch.randn(4, 20)
    layer = DropConnect(linear, 0.3, mc_samples=5000).eval()
    with torch.no_grad():
        estimate = layer(x).double()
    mean, var = gaussian_moments(linear, x, 0.3)
    assert ((estimate - mean).abs() <= Z * var.sqrt() / math.sqrt(5000)).all()


# --- compile, autocast, training -----------------------------------------------------------


def test_torch_compile_training_forward():
    layer, x = probe(0.4, 64, 48)
    y = torch.compile(layer)(x)
    assert y.shape == (64, 48)
    assert_fraction((y == 0).double().mean().item(), y.numel(), 0.4)


@pytest.mark.parametrize("mc_samples", [0, 16])
@pytest.mark.parametrize("training", [True, False])
def test_bf16_autocast_forward(mc_samples, training):
    layer = DropConnect(nn.Linear(8, 4), 0.5, mc_samples, activation=torch.relu).train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 8))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 4) and y.isfinite().all()






TASKS = {
    "linear": lambda: (
        nn.Sequential(DropConnect(nn.Linear(10, 64), 0.5, activation=torch.relu), nn.Linear(64, 2)),
        blobs(),
    ),
    "conv": lambda: (
        nn.Sequential(
            DropConnect(nn.Conv2d(1, 8, 3, padding=1), 0.3, activation=torch.relu),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 2),
        ),
        stripes(),
    ),
}




@pytest.mark.parametrize("name", TASKS)
def test_training_with_dropconnect_reduces_loss(name):
    model, (x, labels) = TASKS[name]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    initial = eval_loss(model, x, labels)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    # over seeds 0-9 the ratio final/initial was at most 0.118 (linear), under 0.001 (conv)
    assert eval_loss(model, x, labels) < 0.5 * initial
