"""Small learnable tasks, made in the test, for 'the loss falls with the layer in place'."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def blobs(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """10 Gaussian features; the label is whether the first three sum above zero."""
    x = torch.randn(n, 10)
    return x, (x[:, :3].sum(1) > 0).long()


def stripes(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images: horizontal stripes (class 1) or vertical ones (class 0), plus noise."""
    labels = torch.randint(0, 2, (n,))
    wave = torch.cos(torch.arange(8.0) * math.pi)
    horizontal, vertical = wave.view(8, 1).expand(8, 8), wave.view(1, 8).expand(8, 8)
    images = torch.where(labels.view(-1, 1, 1) == 1, horizontal, vertical)
    return (images + 0.5 * torch.randn(n, 8, 8)).unsqueeze(1), labels


def eval_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-entropy in eval mode (no dropout noise), leaving the model in train mode."""
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), labels).item()
    model.train()
    return loss
