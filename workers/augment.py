"""Standard image augmentation for child training: random crop from a padded image and a
random horizontal flip, batched on the device with no per-example Python loop.

``crop-flip`` is the CIFAR recipe (pad 4, crop back, flip with probability 1/2; He et al.
2016) that AutoDropout's proxies train with; on 28x28 Fashion-MNIST the padding is the same
4 pixels (zero-padded in the standardised space, i.e. the mean image value). Draws come
from the caller's generator, so a seed gives the same run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autodropout.validation import check_choice

AUGMENTATIONS = ("none", "crop-flip")
CROP_PADDING = 4


def check_augmentation(name: str, field: str = "augment", error: type[Exception] = ValueError
                       ) -> str:
    return check_choice(name, AUGMENTATIONS, field, error=error)


def augment(images: Tensor, name: str, generator: torch.Generator) -> Tensor:
    """``images`` (N, C, H, W), standardised, augmented by ``name`` (see the module doc)."""
    if name == "none":
        return images
    return random_flip(random_crop(images, CROP_PADDING, generator), generator)


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Each image cropped back to (H, W) at a random offset of the image zero-padded by
    ``padding`` pixels on every side."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)            # (N, C, H+2p, W+2p)
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)    # (N, 1, 1)
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)   # (N, 1, 1)
    rows = (top + torch.arange(h).view(1, h, 1)).to(images.device, non_blocking=True)  # (N, H, 1)
    cols = (left + torch.arange(w).view(1, 1, w)).to(images.device, non_blocking=True)  # (N, 1, W)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)         # (N, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (N, C, H, W)


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5       # (N,)
    flip = flip.to(images.device, non_blocking=True).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)                   # (N, C, H, W)
