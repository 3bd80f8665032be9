"""DropConnect: drop weights instead of activations, with moment-matching inference."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autodropout.validation import check_int, check_probability

from .base import DropoutLayer, inverted_keep_mask


class DropConnect(DropoutLayer):
    """DropConnect around an ``nn.Linear`` or ``nn.Conv2d`` (Wan et al., 2013).

    Training: ``u = x * (W ⊙ M / (1 - p)) + b`` with a fresh ``M ~ Bernoulli(1 - p)`` per
    weight entry, drawn once per forward call and shared by the batch (the paper draws one
    per example; sharing keeps a single matmul); ``y = activation(u)``, where ``activation``
    (default identity) belongs to the layer in every mode so that MC inference can average
    it. ``p`` is the probability of dropping a weight. The ``1 / (1 - p)`` rescale makes
    ``E[W ⊙ M / (1 - p)] = W``, so the mean-weight network is the expected one. Biases are
    never dropped. Gradients reach the wrapped ``module.weight``, which stays the only
    parameter (``state_dict`` keys ``module.weight``, ``module.bias``).

    Eval with ``mc_samples == 0``: ``y = activation(module(x))`` (mean weights).

    Eval with ``mc_samples > 0`` (the paper's inference): each pre-activation is a sum of
    many independent terms, so it is approximated by a Gaussian with the exact moments
    ``mean = x * W + b`` and ``var = p / (1 - p) * (x ⊙ x) * (W ⊙ W)`` (``*`` being the
    module's own linear map or convolution). ``mc_samples`` draws ``u`` from it and the
    output is the average of ``activation(u)``. This differs from the mean-weight output only
    through a nonlinear ``activation`` such as ReLU (``E[relu(u)] > relu(E[u])``); with the
    default identity it just adds sampling noise. It needs ``p < 1`` and memory for
    ``mc_samples`` copies of the output.
    """

    def __init__(
        self,
        module: nn.Module,
        p: float = 0.5,
        mc_samples: int = 0,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            kind = type(module).__name__
            raise ValueError(f"module must be an nn.Linear or nn.Conv2d, got {kind}")
        self.mc_samples = check_int(mc_samples, "mc_samples", low=0)
        self.p = check_probability(p)
        if self.mc_samples > 0 and self.p >= 1.0:
            raise ValueError("p must be < 1 when mc_samples > 0 (the weight variance diverges)")
        self.module = module
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.p > 0.0:
            weight = self.module.weight
            masked = weight * inverted_keep_mask(tuple(weight.shape), self.p, weight)
            return self.activate(self.apply_weight(x, masked, self.module.bias))
        if not self.training and self.mc_samples > 0 and self.p > 0.0:
            return self.moment_matched_average(x)
        return self.activate(self.module(x))

    def apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The wrapped module's map with ``weight`` and ``bias`` in place of its own."""
        if isinstance(self.module, nn.Linear):
            return F.linear(x, weight, bias)
        return self.module._conv_forward(x, weight, bias)

    def moment_matched_average(self, x: Tensor) -> Tensor:
        mean = self.module(x)
        weight = self.module.weight
        var = self.apply_weight(x * x, weight * weight, None) * (self.p / (1.0 - self.p))
        noise = torch.randn((self.mc_samples, *mean.shape), dtype=mean.dtype, device=mean.device)
        # clamp: Winograd/FFT convolutions may round a zero variance slightly negative
        samples = mean + var.clamp_min(0.0).sqrt() * noise
        return self.activate(samples).mean(dim=0)

    def activate(self, u: Tensor) -> Tensor:
        return u if self.activation is None else self.activation(u)

    def extra_repr(self) -> str:
        text = f"p={self.p}, mc_samples={self.mc_samples}"
        if self.activation is not None and not isinstance(self.activation, nn.Module):
            text += f", activation={getattr(self.activation, '__name__', repr(self.activation))}"
        return text
