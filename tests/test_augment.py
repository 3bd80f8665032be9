"""Crop-and-flip augmentation: every output is the input shifted (and maybe mirrored), the
offsets and flips are uniform, and a seed gives the same batch."""

from __future__ import annotations

import pytest
import torch
from stats import assert_fraction

from workers.augment import CROP_PADDING, augment, check_augmentation, random_crop, random_flip


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) moved by (dy, dx) pixels, zeros where it left the frame."""
    out = torch.zeros_like(image)
    h, w = image.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_each_crop_is_a_shift_of_at_most_the_padding_and_offsets_are_uniform():
    images = torch.rand(4000, 2, 9, 7) + 1  # no zeros, so the shift is unambiguous
    out = random_crop(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    offsets = []
    for image, cropped in zip(images, out):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(shifted(image, dy, dx), cropped)]
        assert len(matches) == 1
        offsets.append(matches[0])
    for value in range(-2, 3):  # each of the 5 offsets per axis with probability 1/5
        assert_fraction(sum(dy == value for dy, _ in offsets) / len(offsets), len(offsets), 0.2)
        assert_fraction(sum(dx == value for _, dx in offsets) / len(offsets), len(offsets), 0.2)


def test_flip_mirrors_half_of_the_images():
    images = torch.rand(20000, 1, 3, 4)
    out = random_flip(images, torch.Generator().manual_seed(1))
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert_fraction(flipped.float().mean().item(), len(images), 0.5)


def test_augment_is_seeded_and_none_is_the_identity():
    images = torch.rand(64, 1, 28, 28)
    first = augment(images, "crop-flip", torch.Generator().manual_seed(3))
    again = augment(images, "crop-flip", torch.Generator().manual_seed(3))
    other = augment(images, "crop-flip", torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert augment(images, "none", torch.Generator()) is images
    assert CROP_PADDING == 4


def test_unknown_augmentation_names_the_choices():
    with pytest.raises(ValueError, match=r"augment must be one of \[none, crop-flip\], got 'mixup'"):
        check_augmentation("mixup")
