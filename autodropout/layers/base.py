"""What every autodropout layer shares: ``p`` as the drop probability, identity at eval."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autodropout.validation import check_probability


def check_rank(x: Tensor, ranks: tuple[int, ...], layer: str, name: str = "input") -> None:
    """Raise ``ValueError`` unless ``x.dim()`` is one of ``ranks``."""
    if x.dim() not in ranks:
        expected = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(f"{layer}: {name} must be {expected}, got {x.dim()}D shape {tuple(x.shape)}")


def inverted_keep_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """Bernoulli(1 - p) keep mask of ``shape`` already scaled by 1/(1 - p).

    At ``p == 1`` the mask is all zeros (no division by zero, no NaN).
    """
    if p >= 1.0:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    keep = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1.0 - p)
    return keep.div_(1.0 - p)


class DropoutLayer(nn.Module):
    """Marker base of the family: a stochastic regulariser active only in training mode.

    :func:`autodropout.mc_dropout` keeps every ``DropoutLayer`` (and ``torch.nn`` dropout)
    stochastic at inference. Layers with a fixed rate derive from :class:`KeepMaskDropout`.

    State that training forwards advance (step counters, cached relevances) must change only
    when :attr:`updates_state` is true, so that Monte Carlo sampling leaves the layer as it was.
    """

    mc_sampling: bool = False
    """Set by :func:`autodropout.mc_dropout` while it samples masks in training mode."""

    @property
    def updates_state(self) -> bool:
        """Whether this forward may advance training-time state: training, not MC sampling."""
        return self.training and not self.mc_sampling


class KeepMaskDropout(DropoutLayer):
    """Draw a keep mask, multiply, rescale so that E[y] = x; identity at eval.

    ``p`` is the drop probability. Subclasses implement :meth:`scaled_keep_mask`, returning
    a mask that broadcasts against the input and already carries the rescale factor.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = check_probability(p)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if not self.training or self.p == 0.0:
            return x
        return x * self.scaled_keep_mask(x)

    def check_input(self, x: Tensor) -> None:
        """Validate the input's rank; the default accepts any tensor."""

    def scaled_keep_mask(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"p={self.p}"
