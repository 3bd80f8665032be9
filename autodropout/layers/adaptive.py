"""Adaptive dropout: drop rates that depend on the data, the weights or the units' relevance."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from autodropout.validation import (
    check_bool,
    check_choice,
    check_int,
    check_probability,
    check_real,
)

from .base import DropoutLayer

RELEVANCE_METHODS = ("grad_x_input", "lrp_epsilon")
JUMPOUT_SAMPLINGS = ("algorithm1", "truncated")
JUMPOUT_FRACTIONS = ("batch", "sample")


class Standout(DropoutLayer):
    r"""Standout (Ba & Frey, 2013, "Adaptive dropout for training deep neural networks").

    Wraps an ``nn.Linear`` whose pre-activation ``a = W x + b`` also drives a belief network
    with tied weights. Unit ``j`` is kept with probability

    .. math:: \pi_j = \sigma(\alpha a_j + \beta),

    so its drop probability is ``p_j = 1 - pi_j`` (data dependent, returned by
    :meth:`drop_probability`). Training: ``y = m * f(a)`` with ``m ~ Bernoulli(pi)``, *not*
    rescaled. Eval: ``y = pi * f(a)``, the expectation of the training output, which is the
    paper's inference rule. ``f`` is ``activation`` (ReLU by default).

    ``pi`` is detached: autograd treats the belief network as a constant, so the weights learn
    only through the main path ``f(a)``. The paper ties the belief network to the layer as an
    affine function of its weights rather than learning it by its own gradient, and a Bernoulli
    sample carries no gradient to ``pi`` in training anyway; detaching also keeps the eval
    gradient consistent with the training one.
    """

    def __init__(
        self,
        module: nn.Linear,
        alpha: float = 1.0,
        beta: float = 0.0,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Linear):
            raise ValueError(f"module must be an nn.Linear, got {type(module).__name__}")
        self.module = module
        self.alpha = check_real(alpha, "alpha")
        self.beta = check_real(beta, "beta")
        self.activation = nn.ReLU() if activation is None else activation

    def forward(self, x: Tensor) -> Tensor:
        pre_activation = self.module(x)
        keep = torch.sigmoid(self.alpha * pre_activation.detach() + self.beta)
        if self.training:
            keep = torch.bernoulli(keep)
        return keep * self.activation(pre_activation)

    @torch.no_grad()
    def drop_probability(self, x: Tensor) -> Tensor:
        """Per-unit drop probability ``1 - pi = sigmoid(-(alpha * a + beta))`` for input ``x``."""
        return torch.sigmoid(-(self.alpha * self.module(x) + self.beta))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


class Jumpout(DropoutLayer):
    r"""Jumpout: dropout at a random, activation-normalised rate, for inputs out of a ReLU.

    Each training forward follows Algorithm 1 of the paper. With ``q+`` the fraction of active
    units (``x > 0``) and ``u`` uniform on ``[0, 1)`` per element:

    .. math::
        p = \min(p_{min} + |\epsilon|,\ p_{max}),\ \epsilon \sim N(0, \sigma^2); \qquad
        p' = \min(p / q^+,\ 1); \qquad
        y = x \cdot \mathbb{1}[u \ge p'] \cdot (1 - p')^{-0.75}

    1. The drop probability ``p`` is drawn from a monotone decreasing distribution: a
       half-normal of scale ``sigma`` shifted to start at ``p_min`` and clipped at ``p_max``,
       so every draw beyond ``p_max`` becomes exactly ``p_max`` (a point mass of
       ``P(|eps| >= p_max - p_min)``, about 4.9 % with the defaults). ``sampling="truncated"``
       draws instead from the half-normal ``|N(0, sigma^2)|`` *conditioned* on
       ``[p_min, p_max]`` (a density, no point mass; the paper's prose calls its distribution
       a truncated half-Gaussian, Algorithm 1 clips).
    2. Only active units can be deactivated, so ``p`` is normalised by ``q+``: ``p'`` is the
       drop probability among active units and the expected deactivated fraction of the layer
       is ``q+ p' = min(p, q+)``: ``p`` whatever ``q+`` is, as long as ``p <= q+``. The cap at
       1 is the only cap, and it acts only when ``p > q+`` (fewer active units than the rate
       asks to drop): then every active unit is dropped. Step 3 of Algorithm 1 writes no cap
       (a rate above 1 is not a probability); this layer adds none below 1.
    3. Survivors are multiplied by ``(1 - p')^{-0.75}`` instead of ``1 / (1 - p')``, the
       paper's compromise between keeping the mean and the variance consistent with eval
       (which matters when batch normalisation follows).

    Zero inputs stay zero; negative inputs (e.g. a BatchNorm output before its ReLU) are
    masked and scaled like the rest, so ``relu(y)`` equals Jumpout applied after the ReLU.
    Identity at eval.

    Granularity (section 3.4: Algorithm 1 is written for one data point; for a mini-batch
    ``q+`` can be each sample's own or the average over the batch, and the paper uses the
    average): ``per_sample`` chooses one ``p`` per call or one per sample (first axis);
    ``active_fraction`` chooses ``q+`` over the whole batch (the mean of the samples' own
    fractions) or per sample. The default, one ``p`` and the batch ``q+``, is the paper's
    "adaptive dropout rate per mini-batch".

    Paper: Wang, Zhou & Bilmes, 2019, "Jumpout: Improved Dropout for Deep Neural Networks with
    ReLUs" (Algorithm 1, section 3).

    Args:
        p_min: smallest drop probability ``p`` (the shift of the half-normal); paper: 0.01.
        p_max: largest drop probability ``p`` (the clip); paper: 0.6.
        sigma: standard deviation of the half-normal, the one hyper-parameter the paper tunes;
            ``None`` means ``p_max / 2``.
        sampling: ``"algorithm1"`` (default, ``min(p_min + |eps|, p_max)``) or
            ``"truncated"`` (``|eps|`` conditioned on ``[p_min, p_max]``, by the inverse CDF
            on device).
        per_sample: one drop probability ``p`` per sample instead of one per call.
        active_fraction: ``"batch"`` (default) or ``"sample"``: whose ``q+`` normalises ``p``.
        record_rates: store the sampled ``p`` (before normalisation, shape ``(1,)`` or
            ``(N,)``) of each training forward in :attr:`last_rates` (not under Monte Carlo
            sampling, which leaves the layer as it was).

    Shape: any input; with ``per_sample=True`` or ``active_fraction="sample"`` rank >= 2, the
    first axis the batch. Output has the input's shape and dtype (the rates and mask are
    float32, so bf16 autocast is fine).

    Sampling, normalisation and masking are tensor operations on the input's device: no
    host-device synchronisation and no branching on tensor values, so the forward compiles
    under :func:`torch.compile` without graph breaks.

    Example::

        >>> layer = Jumpout(p_min=0.01, p_max=0.6, sigma=0.3)
        >>> hidden = torch.relu(torch.randn(32, 64))
        >>> layer(hidden).shape
        torch.Size([32, 64])
        >>> layer.eval()(hidden) is hidden
        True
    """

    def __init__(
        self,
        p_min: float = 0.01,
        p_max: float = 0.6,
        sigma: float | None = None,
        sampling: str = "algorithm1",
        per_sample: bool = False,
        active_fraction: str = "batch",
        record_rates: bool = False,
    ) -> None:
        super().__init__()
        self.p_min = check_probability(p_min, "p_min")
        self.p_max = check_probability(p_max, "p_max")
        if self.p_min > self.p_max:
            raise ValueError(f"p_min must not exceed p_max, got p_min={p_min}, p_max={p_max}")
        if sigma is None:
            sigma = self.p_max / 2 if self.p_max > 0 else 1.0
        self.sigma = check_real(sigma, "sigma", low=0, low_open=True)
        self.sampling = check_choice(sampling, JUMPOUT_SAMPLINGS, "sampling")
        self.per_sample = check_bool(per_sample, "per_sample")
        self.active_fraction = check_choice(active_fraction, JUMPOUT_FRACTIONS, "active_fraction")
        self.record_rates = check_bool(record_rates, "record_rates")
        self.last_rates: Tensor | None = None

    def sample_rates(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``n`` float32 drop probabilities ``p`` from the distribution ``sampling`` names."""
        if self.sampling == "algorithm1":
            rates = torch.randn(n, device=device).abs_().mul_(self.sigma).add_(self.p_min)
            return rates.clamp_(max=self.p_max)
        to_erf = 1.0 / (self.sigma * math.sqrt(2.0))
        low, high = math.erf(self.p_min * to_erf), math.erf(self.p_max * to_erf)
        u = torch.rand(n, device=device).mul_(high - low).add_(low)
        rates = torch.erfinv(u).div_(to_erf)
        # erf saturates at 1 in float32 for a tiny sigma: the mass then sits at p_min
        return rates.nan_to_num_(nan=self.p_min, posinf=self.p_min).clamp_(self.p_min, self.p_max)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        by_sample = self.active_fraction == "sample"
        if (self.per_sample or by_sample) and x.dim() < 2:
            raise ValueError(
                f"Jumpout: per-sample rates or active fractions need an input of rank >= 2 "
                f"(batch first), got shape {tuple(x.shape)}"
            )
        rates = self.sample_rates(x.shape[0] if self.per_sample else 1, x.device)
        if self.record_rates and self.updates_state:
            self.last_rates = rates
        active = x > 0
        if by_sample:
            active_fraction = active.flatten(1).float().mean(1)
        else:
            active_fraction = active.float().mean().reshape(1)
        tiny = torch.finfo(torch.float32).tiny
        # p = 0 with no active unit stays 0; any p > 0 with no active unit drops everything
        active_rates = (rates / active_fraction.clamp_min(tiny)).clamp_(max=1.0)
        if self.per_sample or by_sample:
            active_rates = active_rates.reshape((-1,) + (1,) * (x.dim() - 1))
        else:
            active_rates = active_rates.reshape((1,) * x.dim())
        keep = torch.rand(x.shape, device=x.device) >= active_rates
        # u >= 1 never holds, so a rate of 1 keeps nothing and its infinite scale is never used
        scale = torch.where(keep, (1.0 - active_rates).pow(-0.75), 0.0)
        return x * scale.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"p_min={self.p_min}, p_max={self.p_max}, sigma={self.sigma}, "
            f"sampling={self.sampling!r}, per_sample={self.per_sample}, "
            f"active_fraction={self.active_fraction!r}"
        )


def capped_rates_with_mean(weights: Tensor, p: float, p_max: float) -> Tensor:
    """Rates ``min(s * weights, p_max)`` with ``s`` chosen so that their mean is exactly ``p``.

    ``weights`` is a non-negative 1-D tensor. ``s`` is found by water-filling: with the ``k``
    largest weights capped, ``s_k = (n p - k p_max) / sum(the other weights)``, and the right
    ``k`` is the one whose ``s_k`` caps exactly those ``k``. All on device, no host sync. If
    the target is out of reach (fewer than ``n p / p_max`` positive weights) every positive
    weight gets ``p_max`` and the mean falls short of ``p``; all-zero weights give uniform ``p``.
    """
    n = weights.numel()
    ordered, _ = weights.sort(descending=True)
    rest = ordered.flip(0).cumsum(0).flip(0)
    capped = torch.arange(n, device=weights.device, dtype=weights.dtype)
    scale = (n * p - capped * p_max) / rest
    below_cap = scale * ordered <= p_max
    above_cap = torch.ones_like(below_cap)
    above_cap[1:] = scale[1:] * ordered[:-1] >= p_max
    valid = below_cap & above_cap & (scale >= 0) & torch.isfinite(scale)
    solution = torch.where(valid, scale, torch.zeros_like(scale)).amax()
    solution = torch.where(valid.any(), solution, torch.full_like(solution, math.inf))
    rates = torch.where(weights > 0, (solution * weights).clamp(max=p_max), 0.0)
    return torch.where(weights.sum() > 0, rates, torch.full_like(rates, p))


class RelevanceDropout(DropoutLayer):
    r"""Dropout whose per-feature rate falls with the feature's measured relevance.

    Features are the last input axis. Each feature ``i`` has a relevance ``r_i in [0, 1]``
    and a drop rate ``p_i`` with mean ``p`` (the target drop probability):

    .. math:: p_i = \min(s (1 - r_i), p_{max}), \quad \tfrac{1}{F} \sum_i p_i = p,

    ``s`` found exactly by :func:`capped_rates_with_mean` (the cap is applied before the
    rescale, so no iteration and no residual bias unless the target is out of reach). Training
    output ``y_i = x_i m_i / (1 - p_i)`` with ``m_i ~ Bernoulli(1 - p_i)``; identity at eval.

    The most relevant feature is never dropped; ``p_max`` bounds every rate and so the rescale.

    Relevance is measured during the training backward pass through tensor hooks, detached,
    and refreshed on every ``refresh_every``-th training forward (counted in the ``steps``
    buffer; Monte Carlo sampling under :func:`autodropout.mc_dropout` neither counts nor
    refreshes; a refresh step whose output gets no backward pass leaves the rates as they
    were); until the first refresh every rate is ``p``. The score is the batch mean of a
    per-feature attribution, divided by its maximum:

    - ``"grad_x_input"``: ``|g_i x_i|``, ``g`` the gradient of the loss at this layer's output
      and ``x`` the input before masking, so dropped features are still scored.
    - ``"lrp_epsilon"``: the epsilon rule of layer-wise relevance propagation (Bach et al.,
      2015, "On pixel-wise explanations for non-linear classifier decisions by layer-wise
      relevance propagation") applied through ``next_layer``, the ``nn.Linear`` that consumes
      this layer's output: with ``z = W y + b`` its output and the upper relevance taken as
      gradient x input there, ``R_k = z_k dL/dz_k``, the rule
      ``R_i = sum_k x_i W_ki R_k / (z_k + eps sign(z_k))`` becomes
      ``R_i = x_i sum_k W_ki dL/dz_k |z_k| / (|z_k| + eps)``: gradient x input in which the
      outputs with ``|z_k|`` near or below ``eps`` pass on less relevance. ``eps -> 0``
      recovers ``"grad_x_input"``. ``eps`` is used by this method only.

    ``relevance`` and ``drop_rates`` are buffers sized on the first training forward; they and
    ``steps`` are saved in the ``state_dict``.
    """

    def __init__(
        self,
        p: float = 0.5,
        refresh_every: int = 100,
        method: str = "grad_x_input",
        eps: float = 1e-6,
        p_max: float = 0.95,
        next_layer: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.p = check_probability(p)
        self.p_max = check_probability(p_max, "p_max")
        if self.p > self.p_max:
            raise ValueError(f"p must not exceed p_max, got p={p}, p_max={p_max}")
        self.refresh_every = check_int(refresh_every, "refresh_every", low=1)
        self.method = check_choice(method, RELEVANCE_METHODS, "method")
        self.eps = check_real(eps, "eps", low=0, low_open=True)
        if method == "lrp_epsilon" and not isinstance(next_layer, nn.Linear):
            raise ValueError("next_layer must be the nn.Linear after this layer for lrp_epsilon")
        if method == "grad_x_input" and next_layer is not None:
            raise ValueError("next_layer is only used by method='lrp_epsilon'")
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("relevance", torch.empty(0))
        self.register_buffer("drop_rates", torch.empty(0))
        self._pending_lrp: tuple[Tensor, Tensor] | None = None
        if next_layer is not None:
            # not a submodule: the model already owns next_layer and its parameters
            next_layer.register_forward_hook(self._attach_lrp_hook)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        self._size_buffers(x)
        keep_probability = 1.0 - self.drop_rates
        scale = torch.where(keep_probability > 0, 1.0 / keep_probability, 0.0)
        keep = torch.rand(x.shape, device=x.device) < keep_probability
        y = x * (keep * scale).to(x.dtype)
        if not self.updates_state:
            return y
        self.steps.add_(1)
        refresh_due = self.steps % self.refresh_every == 0
        if y.requires_grad:
            if self.method == "grad_x_input":
                y.register_hook(partial(self._refresh_from_output_grad, x.detach(), refresh_due))
            else:
                self._pending_lrp = (x.detach(), refresh_due)
        return y

    def _size_buffers(self, x: Tensor) -> None:
        features = x.shape[-1]
        if self.drop_rates.numel() == 0:
            self.relevance = torch.ones(features, device=x.device)
            self.drop_rates = torch.full((features,), self.p, device=x.device)
        elif self.drop_rates.numel() != features:
            raise ValueError(
                f"RelevanceDropout: input must have {self.drop_rates.numel()} features "
                f"in its last axis, got shape {tuple(x.shape)}"
            )

    def _refresh_from_output_grad(self, x: Tensor, refresh_due: Tensor, grad: Tensor) -> None:
        with torch.no_grad():
            self._refresh((grad * x).abs(), refresh_due)

    def _attach_lrp_hook(self, layer: nn.Linear, inputs: tuple[Tensor, ...], z: Tensor) -> None:
        pending, self._pending_lrp = self._pending_lrp, None
        if pending is None or not z.requires_grad:
            return
        x, refresh_due = pending
        hook = partial(self._refresh_from_lrp, x, z.detach(), layer.weight.detach(), refresh_due)
        z.register_hook(hook)

    def _refresh_from_lrp(
        self, x: Tensor, z: Tensor, weight: Tensor, refresh_due: Tensor, grad: Tensor
    ) -> None:
        with torch.no_grad():
            damped = grad * z.abs() / (z.abs() + self.eps)
            self._refresh((x * (damped @ weight.to(damped.dtype))).abs(), refresh_due)

    # runs inside backward: traced into a compiled backward, the buffer writes break the graph
    @torch.compiler.disable
    def _refresh(self, attribution: Tensor, refresh_due: Tensor) -> None:
        score = attribution.float().flatten(0, -2).mean(0)
        relevance = score / score.max().clamp_min(torch.finfo(score.dtype).tiny)
        rates = capped_rates_with_mean(1.0 - relevance, self.p, self.p_max)
        # new tensors, not in-place writes: a compiled backward may still read the old rates
        self.relevance = torch.where(refresh_due, relevance, self.relevance)
        self.drop_rates = torch.where(refresh_due, rates, self.drop_rates)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("relevance", "drop_rates"):
            stored = state_dict.get(prefix + name)
            if stored is not None and self._buffers[name].numel() == 0:
                self._buffers[name] = torch.empty_like(stored, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"p={self.p}, p_max={self.p_max}, refresh_every={self.refresh_every}, "
            f"method={self.method!r}, eps={self.eps}"
        )
