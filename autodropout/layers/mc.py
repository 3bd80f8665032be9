"""Monte Carlo dropout (Gal & Ghahramani, 2016): dropout kept on at inference."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from autodropout.validation import check_int

from .base import DropoutLayer

DROPOUT_TYPES = (DropoutLayer, nn.modules.dropout._DropoutNd)


def is_dropout(module: nn.Module) -> bool:
    """Whether ``module`` is a dropout-family layer (ours or ``torch.nn``'s, alpha included)."""
    return isinstance(module, DROPOUT_TYPES)


@contextmanager
def mc_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Sample dropout masks at inference: everything in eval mode except the dropout layers.

    Inside the block every module's ``training`` flag is ``False`` (BatchNorm normalises with
    its running statistics and does not update them) except the dropout-family layers
    (:class:`~autodropout.layers.base.DropoutLayer` and ``torch.nn`` dropout, alpha dropout
    included), which keep drawing masks with their drop probability ``p``. Those of ours also
    get ``mc_sampling = True``, so step counters and caches do not advance
    (:attr:`~autodropout.layers.base.DropoutLayer.updates_state`). Flags are set directly,
    not through ``Module.train``. On exit, even by an exception, every module's previous
    ``training`` and ``mc_sampling`` are restored exactly. Gradients are not disabled.
    """
    modules = list(model.modules())
    saved = [(module, module.training, vars(module).get("mc_sampling")) for module in modules]
    try:
        for module in modules:
            module.training = is_dropout(module)
            if isinstance(module, DropoutLayer):
                module.mc_sampling = True
        yield model
    finally:
        for module, was_training, was_sampling in saved:
            module.training = was_training
            if was_sampling is None:
                vars(module).pop("mc_sampling", None)  # back to the class default
            else:
                module.mc_sampling = was_sampling


def mc_predict(model: nn.Module, x: Tensor, samples: int = 30) -> tuple[Tensor, Tensor]:
    """Predictive mean and variance of ``model(x)`` over ``samples`` MC-dropout passes.

    Runs ``samples`` forwards under :func:`mc_dropout` and :func:`torch.no_grad`, each
    drawing fresh masks with every layer's drop probability ``p``, and returns the sample
    mean and the *unbiased* sample variance ``sum (y_t - mean)^2 / (samples - 1)`` per
    output element (Welford's update: one pass, memory of two outputs, numerically stable).
    Both are accumulated and returned in at least float32. ``samples`` must be at least 2.
    """
    samples = check_int(samples, "samples", low=2)
    with torch.no_grad(), mc_dropout(model):
        first = model(x)
        mean = first.to(torch.promote_types(first.dtype, torch.float32))
        squared_deviations = torch.zeros_like(mean)
        for count in range(2, samples + 1):
            output = model(x).to(mean.dtype)
            delta = output - mean
            mean = mean + delta / count
            squared_deviations.add_(delta * (output - mean))
    return mean, squared_deviations / (samples - 1)
