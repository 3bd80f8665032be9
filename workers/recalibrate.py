"""Re-estimate BatchNorm statistics with every dropout mask off, after training.

Masks on BatchNorm outputs change the variance the next BatchNorm sees between training
and eval (Li et al. 2019, "Understanding the disharmony between dropout and batch
normalization"). Re-estimating each BatchNorm's running mean and variance on training
batches with the rest of the model in eval mode (dropout layers, patterns and their hooks
off) gives the statistics the eval-mode model really meets. This is
``torch.optim.swa_utils.update_bn`` with one difference: ``update_bn`` puts the whole model
in training mode, which would keep every mask on.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Replace the running statistics of every BatchNorm of ``model`` by their exact average
    over ``batches`` (model inputs), forwarded with only the BatchNorm layers in training
    mode. Returns the number of BatchNorm layers; the model's modes are restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches, as update_bn does
        norm.train()
    try:
        for inputs in batches:
            model(inputs)
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    return len(norms)
