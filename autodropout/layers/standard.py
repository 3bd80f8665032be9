"""Fixed-rate dropout: element-wise, Gaussian, SELU-preserving, whole-channel and time-locked."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from autodropout.validation import check_int, check_probability

from .base import DropoutLayer, KeepMaskDropout, check_rank, inverted_keep_mask


class Dropout(KeepMaskDropout):
    """Standard inverted dropout (Srivastava et al., 2014).

    ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` drawn independently per element,
    so ``E[y] = x``; identity at eval. ``p`` is the probability of zeroing an element; at
    ``p = 1`` the output is all zeros (no NaN for finite input).

    The forward pass calls :func:`torch.nn.functional.dropout`, which is one fused kernel
    on CUDA that saves a boolean mask for backward; :meth:`scaled_keep_mask` draws the
    same mask explicitly for code that needs it.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def scaled_keep_mask(self, x: Tensor) -> Tensor:
        return inverted_keep_mask(tuple(x.shape), self.p, x)


class GaussianDropout(KeepMaskDropout):
    """Multiplicative Gaussian noise (Srivastava et al., 2014, section 10).

    ``y = x * eps`` with ``eps ~ N(1, p / (1 - p))`` drawn independently per element: the
    same mean and variance as the inverted Bernoulli mask of :class:`Dropout` with drop
    probability ``p``. Identity at eval. The variance diverges as ``p -> 1``; ``p = 1``
    gives all zeros, matching :class:`Dropout`.
    """

    def scaled_keep_mask(self, x: Tensor) -> Tensor:
        if self.p >= 1.0:
            return torch.zeros_like(x)
        std = math.sqrt(self.p / (1.0 - self.p))
        return torch.randn_like(x).mul_(std).add_(1.0)


class AlphaDropout(DropoutLayer):
    """Alpha dropout for self-normalising (SELU) networks (Klambauer et al., 2017).

    Dropped elements are set to SELU's negative saturation ``a' = -lambda * alpha`` instead of
    0, then an affine map restores the moments:
    ``y = a * (x * m + a' * (1 - m)) + b`` with ``m ~ Bernoulli(1 - p)``,
    ``a = ((1 - p) * (1 + p * a'^2))^(-1/2)`` and ``b = -a * p * a'``. For standardised
    inputs (mean 0, variance 1, as SELU layers produce) the output keeps mean 0 and
    variance 1. ``p`` is the drop probability; identity at eval; ``p = 1`` gives zeros
    (the affine correction diverges there).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = check_probability(p)

    def forward(self, x: Tensor) -> Tensor:
        return F.alpha_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeatureAlphaDropout(AlphaDropout):
    """Alpha dropout of whole channels (Klambauer et al., 2017).

    Same formula and moments as :class:`AlphaDropout`, but one ``m ~ Bernoulli(1 - p)``
    per (sample, channel) of an input ``(N, C, *)``, shared over the remaining axes. Each
    element's mean 0 / variance 1 is preserved for standardised SELU inputs. ``p`` is the
    probability of dropping a channel; identity at eval; ``p = 1`` gives zeros.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(
                f"FeatureAlphaDropout: input must be at least 2D (N, C, *), "
                f"got {x.dim()}D shape {tuple(x.shape)}"
            )
        return F.feature_alpha_dropout(x, self.p, self.training)


class SpatialDropout(KeepMaskDropout):
    """Spatial dropout: drop whole feature maps (Tompson et al., 2015).

    For ``x`` of shape ``(N, C, *spatial)``, ``y[n, c] = x[n, c] * m[n, c] / (1 - p)`` with
    one ``m[n, c] ~ Bernoulli(1 - p)`` per sample and channel, so neighbouring, strongly
    correlated activations are dropped together. ``p`` is the probability of dropping a
    channel. ``spatial_dims`` (1, 2 or 3) fixes the expected rank ``spatial_dims + 2``; any
    other rank raises ``ValueError`` (an unbatched input is never reinterpreted).
    """

    def __init__(self, p: float = 0.5, spatial_dims: int = 2) -> None:
        super().__init__(p)
        self.spatial_dims = check_int(spatial_dims, "spatial_dims", low=1, high=3)

    def check_input(self, x: Tensor) -> None:
        check_rank(
            x,
            (self.spatial_dims + 2,),
            "SpatialDropout",
            name=f"input (N, C, *spatial) with spatial_dims={self.spatial_dims}",
        )

    def scaled_keep_mask(self, x: Tensor) -> Tensor:
        return inverted_keep_mask((x.shape[0], x.shape[1]) + (1,) * self.spatial_dims, self.p, x)

    def extra_repr(self) -> str:
        return f"p={self.p}, spatial_dims={self.spatial_dims}"


class LockedDropout(KeepMaskDropout):
    """Locked (variational) dropout over time (Gal & Ghahramani, 2016; Merity et al., 2018).

    For a sequence batch ``(N, T, C)`` (``batch_first=True``) or ``(T, N, C)``,
    ``y[n, t, c] = x[n, t, c] * m[n, c] / (1 - p)`` with one ``m[n, c] ~ Bernoulli(1 - p)``
    per sequence and feature, shared by every time step (the AWD-LSTM recipe). ``p`` is the
    probability of dropping a feature of a sequence. Other ranks raise ``ValueError``.
    """

    def __init__(self, p: float = 0.5, batch_first: bool = True) -> None:
        super().__init__(p)
        self.batch_first = bool(batch_first)

    def check_input(self, x: Tensor) -> None:
        layout = "(N, T, C)" if self.batch_first else "(T, N, C)"
        check_rank(x, (3,), "LockedDropout", name=f"input {layout}")

    def scaled_keep_mask(self, x: Tensor) -> Tensor:
        shape = list(x.shape)
        shape[1 if self.batch_first else 0] = 1  # the time axis
        return inverted_keep_mask(tuple(shape), self.p, x)

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}"
