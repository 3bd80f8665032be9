"""Keep masks of AutoDropout pattern sites: tiled rectangles (conv) and spans (sequence).

Every site tiles a *plane* (the H x W map of a channel, a token or feature axis, or a
tokens x features grid) and draws one tiling offset per *instance* (example, channel,
head, token, ...). Masks are boolean, ``True`` = keep, drawn for the whole batch at once:
membership in the dropped tiles is computed arithmetically from broadcast coordinates,
with no Python loop over examples, channels or tiles.

Tiling along one axis (coordinates ``0 .. extent-1``): tile ``k`` covers
``[offset + k*stride, offset + k*stride + size)`` for ``k = 0 .. repeat-1`` (every integer
``k`` for ``repeat = 'fill'``). ``offset`` is uniform on ``0 .. range-1``, independently per
axis, where

* ``range = stride`` for ``'fill'``: every phase of the periodic tiling, so every position
  is dropped with the same probability ``min(size, stride) / stride`` per axis;
* ``range = max(stride, extent - span + 1)`` for a finite ``repeat``, where
  ``span = (repeat-1)*stride + size`` is the length the tiles cover: when the tiles fit,
  they are placed anywhere on the axis without leaving it; otherwise every grid phase
  ``[0, stride)`` is possible and tiles past the end are cut off.

On a 2-D plane a pixel is dropped when both its row and its column lie in a tile
(``size_h x size_w`` rectangles, ``repeat`` per axis). A conv site's dropped set is then
rotated and sheared about the map centre (:func:`source_grid`).

Speed: the number of distinct masks is only the number of offset combinations, so when
``combinations x plane size`` is small (:data:`TABLE_LIMIT`) every mask is built once per
plane and device (:func:`keep_table`) and a draw is one row gather; the kept count then
comes from the table's per-row counts, so the scaled mask is made without summing it.

Conv sites may thin the tiling (:data:`~autodropout.patterns.fields.CONV_FIELDS`):
``p_tile < 1`` keeps each *cell* of the tiling with probability ``1 - p_tile``, independently
per cell and instance, where a pixel's cell is its pair of last tile indices (the ``tile`` of
:func:`tiled` on each axis, in source coordinates after rotation/shear), so a cell is a
tile when ``size <= stride``; ``p_apply < 1`` then keeps the whole plane of an instance with
probability ``1 - p_apply``. Both independent of the offsets, so the expected dropped fraction
is ``p_apply * p_tile`` times the tiling's (see ``search_spaces.bounds``). Such masks are
drawn directly, never from the table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .fields import FILL, site_value

TABLE_LIMIT = 1 << 20
"""Largest ``combinations x plane size`` precomputed as a table of masks (1 MiB as bool)."""

_CACHE_SIZE = 64


def offset_range(extent: int, size: int, stride: int, repeat: int | str) -> int:
    """Number of possible tiling offsets along an axis of ``extent`` positions."""
    if repeat == FILL:
        return stride
    span = (repeat - 1) * stride + size
    return max(stride, extent - span + 1)


def tiled(coords: Tensor, offsets: Tensor, size: int, stride: int, repeat: int | str) -> Tensor:
    """``True`` where ``coords`` (broadcast against ``offsets``) fall in a dropped tile."""
    return last_tile(coords, offsets, size, stride, repeat)[0]


def last_tile(coords: Tensor, offsets: Tensor, size: int, stride: int,
              repeat: int | str) -> tuple[Tensor, Tensor]:
    """:func:`tiled`, and the index of the last tile starting at or before each coordinate
    (clamped to ``repeat - 1``; it may be negative for ``repeat == FILL``, or before the
    first tile, where the coordinate is never in a tile)."""
    distance = coords - offsets
    tile = torch.div(distance, stride, rounding_mode="floor")
    if repeat == FILL:
        return distance - tile * stride < size, tile
    # Only the last tile starting at or before a coordinate can reach it (earlier tiles
    # start further back and have the same size), so one comparison per axis suffices.
    tile = tile.clamp(max=repeat - 1)
    return (distance - tile * stride < size) & (tile >= 0), tile


@dataclass(frozen=True)
class SourceGrid:
    """Where each output pixel samples the untransformed tiling (nearest neighbour).

    ``row_coords``/``col_coords`` list the source rows/columns that occur (they may lie
    outside the map after a rotation); ``row_index``/``col_index`` give, per output pixel
    (flattened row-major), the position of its source row/column in those lists.
    """

    row_coords: Tensor
    col_coords: Tensor
    row_index: Tensor
    col_index: Tensor


@dataclass(frozen=True)
class Tiling:
    """A site's tiling of a 1-D or 2-D plane of shape ``extents``.

    ``sizes`` holds the tile length per plane axis; ``affine`` is ``(rotate, shear_x,
    shear_y)``, used on 2-D planes only.
    """

    extents: tuple[int, ...]
    sizes: tuple[int, ...]
    stride: int
    repeat: int | str
    affine: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def offset_ranges(self) -> tuple[int, ...]:
        return tuple(
            offset_range(extent, size, self.stride, self.repeat)
            for extent, size in zip(self.extents, self.sizes)
        )

    def dropped(self, offsets: list[Tensor]) -> Tensor:
        """Dropped positions, shape ``(*offsets[0].shape, *extents)``, one offset per axis."""
        device = offsets[0].device
        if len(self.extents) == 2 and any(self.affine):
            return self._dropped_transformed(offsets)
        axes = [
            self._axis(torch.arange(extent, device=device), offset, axis)
            for axis, (extent, offset) in enumerate(zip(self.extents, offsets))
        ]
        if len(axes) == 1:
            return axes[0]
        return axes[0][..., :, None] & axes[1][..., None, :]

    def _dropped_transformed(self, offsets: list[Tensor]) -> Tensor:
        height, width = self.extents
        grid = source_grid(height, width, *self.affine, offsets[0].device)
        rows = self._axis(grid.row_coords, offsets[0], 0).index_select(-1, grid.row_index)
        cols = self._axis(grid.col_coords, offsets[1], 1).index_select(-1, grid.col_index)
        return (rows & cols).view(*offsets[0].shape, height, width)

    def _axis(self, coords: Tensor, offsets: Tensor, axis: int) -> Tensor:
        return tiled(coords, offsets[..., None], self.sizes[axis], self.stride, self.repeat)

    def dropped_cells(self, offsets: list[Tensor], p_tile: float) -> Tensor:
        """:meth:`dropped` of a 2-D plane with each cell kept with probability ``1 - p_tile``
        (independently per cell and instance); shape ``(*offsets[0].shape, *extents)``."""
        height, width = self.extents
        device = offsets[0].device
        if any(self.affine):
            grid = source_grid(height, width, *self.affine, device)
            coords, index = (grid.row_coords, grid.col_coords), (grid.row_index, grid.col_index)
        else:
            coords = (torch.arange(height, device=device), torch.arange(width, device=device))
            pixels = torch.arange(height * width, device=device)
            index = (pixels.div(width, rounding_mode="floor"), pixels % width)
        covered, cells, counts = [], [], []
        for axis in (0, 1):
            inside, tile = last_tile(coords[axis], offsets[axis][..., None], self.sizes[axis],
                                     self.stride, self.repeat)
            if self.repeat == FILL:
                low = (int(coords[axis].min()) - self.offset_ranges[axis] + 1) // self.stride
                high = int(coords[axis].max()) // self.stride
            else:
                tile = tile.clamp(min=0)
                low, high = 0, self.repeat - 1
            covered.append(inside.index_select(-1, index[axis]))
            cells.append((tile - low).index_select(-1, index[axis]))
            counts.append(high - low + 1)
        shape = offsets[0].shape
        dropped_cells = torch.rand(*shape, counts[0] * counts[1], device=device) < p_tile
        cell = cells[0] * counts[1] + cells[1]  # (*instances, H*W)
        dropped = covered[0] & covered[1] & dropped_cells.gather(-1, cell)
        return dropped.view(*shape, height, width)


@dataclass(frozen=True)
class KeepTable:
    """Every distinct keep mask of a tiling and its kept count.

    ``rows[i]`` is mask ``i`` flattened, ``columns`` the same table transposed (for masks
    whose plane comes before the instances), ``kept[i]`` its number of kept positions.
    """

    rows: Tensor
    columns: Tensor
    kept: Tensor


_source_grids: dict[tuple, SourceGrid] = {}
_keep_tables: dict[tuple, KeepTable] = {}


def _remember(cache: dict, key: tuple, value):
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def source_grid(
    height: int, width: int, rotate: float, shear_x: float, shear_y: float, device: torch.device
) -> SourceGrid:
    """The inverse affine map sampled at every pixel centre, cached per shape and device.

    The forward map is ``T = R(rotate) @ Shear_x(shear_x) @ Shear_y(shear_y)`` about the map
    centre, in coordinates with x to the right and y *up* (so a positive angle turns the
    pattern counter-clockwise as displayed, row 0 at the top); ``Shear_x`` maps
    ``x -> x + shear_x * y`` and ``Shear_y`` maps ``y -> y + shear_y * x``. Both shears have
    determinant 1, so ``T`` preserves area for every legal parameter set.
    """
    key = (height, width, rotate, shear_x, shear_y, str(device))
    if key in _source_grids:
        return _source_grids[key]
    return _build_source_grid(height, width, rotate, shear_x, shear_y, device, key)


@torch.compiler.disable
def _build_source_grid(
    height: int, width: int, rotate: float, shear_x: float, shear_y: float,
    device: torch.device, key: tuple,
) -> SourceGrid:
    y = (height / 2 - (torch.arange(height, dtype=torch.float64) + 0.5)).view(-1, 1)
    x = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2).view(1, -1)
    angle = math.radians(rotate)
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * x + sin * y  # undo the rotation, then shear_x, then shear_y
    v = -sin * x + cos * y
    u = u - shear_x * v
    v = v - shear_y * u
    rows = torch.floor(height / 2 - v).long().flatten()
    cols = torch.floor(u + width / 2).long().flatten()
    row_low, col_low = int(rows.min()), int(cols.min())
    grid = SourceGrid(
        row_coords=torch.arange(row_low, int(rows.max()) + 1, device=device),
        col_coords=torch.arange(col_low, int(cols.max()) + 1, device=device),
        row_index=(rows - row_low).to(device),
        col_index=(cols - col_low).to(device),
    )
    return _remember(_source_grids, key, grid)


def keep_table(tiling: Tiling, device: torch.device) -> KeepTable:
    """All keep masks of ``tiling``, one per offset combination (row-major), cached."""
    key = (tiling.extents, tiling.sizes, tiling.stride, tiling.repeat, tiling.affine, str(device))
    if key in _keep_tables:
        return _keep_tables[key]
    return _build_keep_table(tiling, device, key)


@torch.compiler.disable
def _build_keep_table(tiling: Tiling, device: torch.device, key: tuple) -> KeepTable:
    ranges = tiling.offset_ranges
    combos = torch.cartesian_prod(*(torch.arange(r, device=device) for r in ranges))
    offsets = [combos] if combos.dim() == 1 else list(combos.unbind(1))
    rows = (~tiling.dropped(offsets)).flatten(1)
    table = KeepTable(rows=rows, columns=rows.t().contiguous(), kept=rows.sum(1))
    return _remember(_keep_tables, key, table)


def sample_keep(
    tiling: Tiling, instances: tuple[int, ...], device: torch.device,
    dtype: torch.dtype | None = None, plane_first: bool = False,
) -> Tensor:
    """Draw one keep mask per instance: shape ``(*instances, *tiling.extents)``.

    With ``dtype`` None the mask is boolean; otherwise it is ``0`` where dropped and
    ``numel / kept`` where kept (kept counted over all instances), in ``dtype``.
    ``plane_first`` lays the result out contiguously as ``(*tiling.extents, *instances)``.
    """
    combinations = math.prod(tiling.offset_ranges)
    shape = (*tiling.extents, *instances) if plane_first else (*instances, *tiling.extents)
    if combinations * math.prod(tiling.extents) > TABLE_LIMIT:
        offsets = [torch.randint(r, instances, device=device) for r in tiling.offset_ranges]
        keep = ~tiling.dropped(offsets)
        if plane_first:
            keep = keep.flatten(0, len(instances) - 1).flatten(1).t().reshape(shape)
        return scaled(keep, dtype)
    table = keep_table(tiling, device)
    pick = torch.randint(combinations, instances, device=device).flatten()
    masks, dim = (table.columns, 1) if plane_first else (table.rows, 0)
    if dtype is None:
        return masks.index_select(dim, pick).view(shape)
    kept = table.kept.index_select(0, pick).sum().clamp(min=1)
    scale = (pick.numel() * table.rows.shape[1] / kept).to(dtype)
    if pick.numel() < combinations:  # scale whichever is smaller: the draws or the table
        return torch.where(masks.index_select(dim, pick), scale, 0).view(shape)
    return torch.where(masks, scale, 0).index_select(dim, pick).view(shape)


def conv_keep_mask(
    site: Mapping, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype | None = None
) -> Tensor:
    """Mask for an (N, C, H, W) activation: (N, 1, H, W) if ``share_c`` else (N, C, H, W)."""
    n, channels, height, width = shape
    tiling = Tiling(
        extents=(height, width),
        sizes=(site["size_h"], site["size_w"]),
        stride=site["stride"],
        repeat=site["repeat"],
        affine=(site["rotate"], site["shear_x"], site["shear_y"]),
    )
    instances = (n, 1 if site["share_c"] else channels)
    p_apply, p_tile = site_value(site, "p_apply"), site_value(site, "p_tile")
    if p_apply == 1 and p_tile == 1:
        return sample_keep(tiling, instances, device, dtype)
    if p_tile < 1:
        offsets = [torch.randint(r, instances, device=device) for r in tiling.offset_ranges]
        keep = ~tiling.dropped_cells(offsets, p_tile)
    else:
        keep = sample_keep(tiling, instances, device)
    if p_apply < 1:
        keep = keep | (torch.rand(instances, device=device) >= p_apply)[..., None, None]
    return scaled(keep, dtype)


def scaled(keep: Tensor, dtype: torch.dtype | None) -> Tensor:
    """A boolean keep mask as is (``dtype`` None), else ``numel / kept`` where kept, in ``dtype``."""
    if dtype is None:
        return keep
    return torch.where(keep, (keep.numel() / keep.sum().clamp(min=1)).to(dtype), 0)


def sequence_keep_mask(
    site: Mapping, shape: tuple[int, ...], attention: bool, device: torch.device,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Mask for (N, T, C) activations, or (N, heads, T_query, T_key) attention probabilities.

    The mask broadcasts against the input; :class:`~autodropout.patterns.PatternDropout`
    documents what ``axis`` and ``share`` mean on each layout.
    """
    size, stride, repeat, axis = site["size"], site["stride"], site["repeat"], site["axis"]

    def spans(*extents: int) -> Tiling:
        return Tiling(extents=extents, sizes=(size,) * len(extents), stride=stride, repeat=repeat)

    if attention:
        n, heads, queries, keys = shape
        lead = (n, 1 if site["share"] else heads)
        if axis == "tokens":
            return sample_keep(spans(keys), (*lead, 1), device, dtype)
        if axis == "features":
            return sample_keep(spans(keys), (*lead, queries), device, dtype)
        return sample_keep(spans(queries, keys), lead, device, dtype)
    n, tokens, features = shape
    if axis == "tokens":
        instances = (n, 1 if site["share"] else features)
        mask = sample_keep(spans(tokens), instances, device, dtype, plane_first=True)
        return mask.permute(1, 0, 2)  # (T, N, C) -> (N, T, C), features still contiguous
    if axis == "features":
        instances = (n, 1 if site["share"] else tokens)
        return sample_keep(spans(features), instances, device, dtype)
    return sample_keep(spans(tokens, features), (n,), device, dtype)
