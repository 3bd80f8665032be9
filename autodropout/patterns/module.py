"""``PatternDropout``: one site of an AutoDropout pattern as a dropout layer."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor

from autodropout.layers.base import DropoutLayer, check_rank
from autodropout.validation import check_int

from .fields import CONV, FILL, SUBLAYERS, check_kind, check_site
from .masks import conv_keep_mask, sequence_keep_mask
from .pattern import Pattern

ATTENTION_PROBS = "attention_probs"


class PatternDropout(DropoutLayer):
    """Structured dropout with a learned pattern (Pham & Le, "AutoDropout", AAAI 2021).

    ``y = x * m * numel(m) / sum(m)`` with a binary keep mask ``m`` (1 = keep) drawn per
    example. The rescale counts the kept positions of the whole batch (as a tensor: no host
    sync), so ``y`` keeps the batch total of a constant ``x``; with ``repeat = 'fill'``
    every position is dropped with the same probability and, when the map is a whole
    number of strides, ``sum(m)`` is the same for every draw, so ``E[y] = x`` elementwise.
    Identity at eval. There is no ``p``: the dropped fraction follows from the site's
    ``size``, ``stride`` and ``repeat`` (for a ``'fill'`` conv site it is
    ``min(size_h, stride) * min(size_w, stride) / stride**2``).

    ``kind="conv"`` (input (N, C, H, W)): rectangles of ``size_h x size_w`` pixels with
    origins on a grid of spacing ``stride`` on both axes, ``repeat`` tiles per axis (or the
    whole map for ``'fill'``), at a random grid offset per example and, unless ``share_c``,
    per channel (offset ranges: :mod:`autodropout.patterns.masks`). The dropped set is then
    rotated by ``rotate`` degrees (counter-clockwise as displayed) and sheared by
    ``(shear_x, shear_y)`` about the map centre, sampling the inverse map at each pixel
    centre with nearest-neighbour rounding. ``p_tile < 1`` drops each cell of the tiling (a
    tile, when ``size <= stride``) only with that probability, independently; ``p_apply < 1``
    applies the whole mask of an example (and channel, unless ``share_c``) only with that
    probability (:mod:`autodropout.patterns.masks`). With both 1 (the defaults, left out of
    the pattern's JSON) the layer is as before. ``residual`` is carried for the code that wires
    the pattern into a network; this layer only masks its input.

    ``kind="sequence"``: spans of ``size`` positions, ``stride`` apart, ``repeat`` per axis.

    * (N, T, C) input (``sublayer`` None or any but ``attention_probs``):
      ``axis="tokens"`` drops token spans, the same for every feature if ``share``, else
      drawn per feature; ``axis="features"`` drops feature spans, the same for every token
      if ``share``, else drawn per token; ``axis="both"`` drops ``size x size`` tiles over
      (tokens, features) (``share`` has nothing to share over here).
    * (N, heads, T_query, T_key) attention probabilities (``sublayer="attention_probs"``):
      spans run over the key axis. ``axis="tokens"`` hides the same keys from every query,
      ``axis="features"`` draws the key spans per query, ``axis="both"`` drops
      ``size x size`` tiles over (query, key); ``share`` uses one mask for all heads.
    """

    def __init__(self, site: Mapping, kind: str = CONV, sublayer: str | None = None) -> None:
        super().__init__()
        self.kind = check_kind(kind)
        if not isinstance(site, Mapping):
            raise ValueError(f"site must be a mapping of site parameters, got {site!r}")
        checked = check_site(self.kind, dict(site), "site")
        if sublayer is not None:
            if self.kind == CONV:
                raise ValueError(f"sublayer must be None for a conv site, got {sublayer!r}")
            if sublayer not in SUBLAYERS or sublayer not in checked["apply_to"]:
                raise ValueError(
                    f"sublayer must be one of the site's apply_to "
                    f"({', '.join(checked['apply_to'])}), got {sublayer!r}"
                )
        self.sublayer = sublayer
        self._site = checked  # a plain dict, so patterned models deep-copy and pickle

    @classmethod
    def from_pattern(
        cls, pattern: Pattern, index: int, sublayer: str | None = None
    ) -> PatternDropout:
        """The layer for site ``index`` of ``pattern``."""
        count = len(pattern.sites)
        index = check_int(index, "index", low=-count, high=count - 1)
        return cls(pattern.sites[index], pattern.kind, sublayer)

    @property
    def site(self) -> Mapping:
        """The site's parameters (read-only)."""
        return MappingProxyType(self._site)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return x
        return x * self._draw(x, x.dtype)

    def keep_mask(self, x: Tensor) -> Tensor:
        """A fresh boolean keep mask (``True`` = keep) that broadcasts against ``x``."""
        self._check_input(x)
        return self._draw(x)

    def _draw(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Boolean keep mask, or (with ``dtype``) the mask already scaled by numel/kept."""
        if self.kind == CONV:
            return conv_keep_mask(self._site, tuple(x.shape), x.device, dtype)
        attention = self.sublayer == ATTENTION_PROBS
        return sequence_keep_mask(self._site, tuple(x.shape), attention, x.device, dtype)

    def _check_input(self, x: Tensor) -> None:
        rank = 3 if self.kind != CONV and self.sublayer != ATTENTION_PROBS else 4
        check_rank(x, (rank,), type(self).__name__)

    def extra_repr(self) -> str:
        site = self._site
        if self.kind == CONV:
            parts = [
                f"size={site['size_h']}x{site['size_w']}",
                f"stride={site['stride']}",
                f"repeat={_repeat(site['repeat'])}",
            ]
            if site["rotate"]:
                parts.append(f"rotate={site['rotate']:g}")
            if site["shear_x"] or site["shear_y"]:
                parts.append(f"shear=({site['shear_x']:g}, {site['shear_y']:g})")
            parts += [f"share_c={site['share_c']}", f"residual={site['residual']}"]
            parts += [f"{name}={site[name]:g}" for name in ("p_apply", "p_tile") if name in site]
            return ", ".join(parts)
        parts = [
            f"size={site['size']}",
            f"stride={site['stride']}",
            f"repeat={_repeat(site['repeat'])}",
            f"axis={site['axis']}",
            f"share={site['share']}",
            f"apply_to={','.join(site['apply_to'])}",
        ]
        if self.sublayer is not None:
            parts.append(f"sublayer={self.sublayer}")
        return ", ".join(parts)


def _repeat(repeat: int | str) -> str:
    return FILL if repeat == FILL else str(repeat)
