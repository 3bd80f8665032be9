"""Structured dropout: contiguous blocks of a feature map (DropBlock), whole residual branches (DropPath)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from autodropout.validation import check_int, check_probability

from .base import KeepMaskDropout, check_rank, inverted_keep_mask

# Block corners are drawn as a fixed number of geometric gaps (fixed shapes: no host sync, no
# recompiles). With mean + 12 sd + 40 draws, a Chernoff bound puts the chance that the Bernoulli
# process holds more corners than were drawn below exp(-60) ~ 1e-26 per call.
_CORNER_MARGIN_SD = 12.0
_CORNER_MARGIN_ABS = 40.0


class DropBlock2d(KeepMaskDropout):
    r"""DropBlock (Ghiasi, Lin & Le, 2018): drop square blocks of a feature map, not single pixels.

    Block corners are Bernoulli(:math:`\gamma`) trials over the *valid region*, the positions
    where a whole ``block_size`` x ``block_size`` block fits inside the map, so no block is
    clipped at the border; every pixel covered by a sampled block is dropped:

    .. math::
        \gamma = \frac{p}{b^2}\,\frac{H W}{(H - b + 1)(W - b + 1)}, \qquad
        y = x \odot M \cdot \frac{\operatorname{numel}(M)}{\sum M}

    with :math:`b` = ``block_size`` and :math:`M` the keep mask. A block is placed by its
    top-left corner and covers rows ``[i, i + b)`` and columns ``[j, j + b)``, so odd and even
    sizes are placed alike (the centre of an even block sits between pixels).

    ``p`` is the drop probability: the target fraction of dropped pixels (overlapping blocks make
    the realised fraction slightly lower, exactly as in the paper). ``p = 1`` drops everything.

    Args:
        p: drop probability.
        block_size: side of the square blocks; must not exceed the map's height or width.
        share_channels: one mask per sample shared by all channels (default: one per channel).
        warmup_steps: if > 0, the drop probability rises linearly from 0 to ``p`` over the first
            ``warmup_steps`` training forwards (the paper's linear schedule); the count is the
            ``steps`` buffer, saved in the ``state_dict``.

    Shape: input and output ``(N, C, H, W)``. Eval mode is the identity.
    """

    def __init__(
        self,
        p: float = 0.1,
        block_size: int = 7,
        share_channels: bool = False,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(p)
        self.block_size = check_int(block_size, "block_size", low=1)
        self.share_channels = bool(share_channels)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", low=0)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        output = super().forward(x)
        if self.updates_state and self.warmup_steps > 0:
            self.steps.add_(1)
        return output

    def check_input(self, x: Tensor) -> None:
        check_rank(x, (4,), "DropBlock2d")
        height, width = x.shape[-2:]
        if self.block_size > min(height, width):
            raise ValueError(
                f"DropBlock2d: block_size={self.block_size} does not fit the {height}x{width} "
                f"feature map of input shape {tuple(x.shape)}"
            )

    def drop_rate(self) -> Tensor:
        """Effective drop probability now, ``p * min(steps / warmup_steps, 1)``, as a tensor."""
        if self.warmup_steps == 0:
            return torch.full((), self.p, dtype=torch.float64, device=self.steps.device)
        progress = (self.steps.double() / self.warmup_steps).clamp(max=1.0)
        return self.p * progress

    def _gamma_over_p(self, height: int, width: int) -> float:
        """gamma / p for an ``height`` x ``width`` map (the paper's formula)."""
        size = self.block_size
        valid_area = (height - size + 1) * (width - size + 1)
        return height * width / (size * size * valid_area)

    def scaled_keep_mask(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        maps = batch if self.share_channels else batch * channels
        rate = self.drop_rate().to(x.device)
        dropped = self._dropped_pixels(rate, maps, height, width, x.device)
        total = dropped.numel()
        kept = total - torch.count_nonzero(dropped)
        # kept == 0 only when everything is dropped, where the scale multiplies zeros only.
        scale = torch.where(rate < 1.0, total / kept.clamp(min=1).double(), 0.0).to(x.dtype)
        mask_shape = (batch, 1 if self.share_channels else channels, height, width)
        return torch.where(dropped.view(mask_shape), 0.0, scale)

    def _dropped_pixels(
        self, rate: Tensor, maps: int, height: int, width: int, device: torch.device
    ) -> Tensor:
        """Flat bool map (``maps * height * width``) of the pixels covered by sampled blocks.

        The corners are the successes of a Bernoulli(gamma) process run over the valid regions of
        all maps laid end to end; they are drawn sparsely as cumulative geometric gaps
        (inverse CDF), since only about gamma of the trials succeed.
        """
        size = self.block_size
        valid_h, valid_w = height - size + 1, width - size + 1
        trials = maps * valid_h * valid_w
        expected = trials * self.p * self._gamma_over_p(height, width)
        draws = min(
            trials, math.ceil(expected + _CORNER_MARGIN_SD * math.sqrt(expected) + _CORNER_MARGIN_ABS)
        )

        gamma = rate * self._gamma_over_p(height, width)
        uniform = torch.rand(draws, dtype=torch.float64, device=device)
        # failures before each success ~ floor(log U / log(1 - gamma)); gamma = 0 gives +inf
        # (no corner) and gamma = 1 gives 0 (every trial a corner).
        failures = torch.nan_to_num(torch.log(uniform) / torch.log1p(-gamma), nan=0.0, posinf=trials)
        position = (failures.clamp(max=trials).long() + 1).cumsum(0) - 1

        valid_area = valid_h * valid_w
        map_index = position.div(valid_area, rounding_mode="floor")
        top = position.remainder(valid_area).div(valid_w, rounding_mode="floor")
        # From valid-region coordinates to map pixels: skip the rows and columns no block starts in.
        corner = position + map_index * (height * width - valid_area) + top * (size - 1)

        pixels = maps * height * width
        # Unused draws (past the last trial) get a block in a scratch area after the maps.
        corner = torch.where(position < trials, corner, pixels)
        rows = torch.arange(size, device=device)
        block = (rows[:, None] * width + rows[None, :]).flatten()
        covered = (corner[:, None] + block).flatten()
        scratch = (size - 1) * (width + 1) + 1  # the extent of one block
        dropped = torch.zeros(pixels + scratch, dtype=torch.bool, device=device)
        return dropped.index_fill_(0, covered, True)[:pixels]

    def extra_repr(self) -> str:
        return (
            f"p={self.p}, block_size={self.block_size}, share_channels={self.share_channels}, "
            f"warmup_steps={self.warmup_steps}"
        )


class DropPath(KeepMaskDropout):
    r"""Stochastic depth (Huang, Sun, Liu, Sedra & Weinberger, 2016), a.k.a. DropPath.

    Drops a residual branch for whole samples: ``y = x * m / (1 - p)`` with one
    :math:`m \sim \text{Bernoulli}(1 - p)` per sample, broadcast over every other axis (mask
    shape ``(N, 1, 1, ...)``). Apply it to the branch, ``x + drop_path(block(x))``. The name
    comes from FractalNet (Larsson, Maire & Shakhnarovich, 2017) and timm.

    ``p`` is the probability of dropping a sample's branch. With ``scale_by_keep=False`` kept
    samples are not rescaled (the paper's original form: rescale at test time instead).

    Shape: any input of rank >= 1 whose first axis is the batch. Eval mode is the identity.
    """

    def __init__(self, p: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__(p)
        self.scale_by_keep = bool(scale_by_keep)

    def check_input(self, x: Tensor) -> None:
        if x.dim() < 1:
            raise ValueError("DropPath: input must have a batch axis (rank >= 1), got a 0D tensor")

    def scaled_keep_mask(self, x: Tensor) -> Tensor:
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if self.scale_by_keep:
            return inverted_keep_mask(shape, self.p, x)
        return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, scale_by_keep={self.scale_by_keep}"


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    r"""Per-block drop rates of the linear decay rule (Huang et al., 2016): ``p_l = l / L * p_L``.

    Blocks are numbered ``l = 1 .. L`` as in the paper, so the first block gets
    ``max_rate / depth`` (not 0) and the last gets ``max_rate``. timm's
    ``linspace(0, max_rate, depth)`` instead gives the first block 0.
    """
    max_rate = check_probability(max_rate, "max_rate")
    depth = check_int(depth, "depth", low=1)
    return [max_rate * block / depth for block in range(1, depth + 1)]
