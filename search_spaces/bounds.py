"""How much a pattern drops, and which choices keep a space's patterns within ``max_drop``.

**Expected dropped fraction** of a site on a plane of a given size: the expectation, over
the site's random offsets (and its ``p_apply``/``p_tile`` draws), of the fraction of the
plane's positions that are dropped. Computed *exactly* from the tile geometry of
:mod:`autodropout.patterns.masks`:

* Along one axis, position ``c`` is covered for offset ``o`` exactly when
  :func:`~autodropout.patterns.masks.tiled` says so; offsets are uniform on
  ``0 .. offset_range - 1``, so ``P(c covered)`` is a count over that range
  (:func:`axis_coverage`). ``c`` may lie outside the map: a rotated or sheared site samples
  the untransformed tiling at source coordinates.
* A conv pixel is dropped when its source row is covered on the row axis and its source
  column on the column axis; the two offsets are independent, so
  ``P(pixel) = P_row(source row) * P_col(source col)`` and the fraction is the mean of that
  over the ``H x W`` output pixels (:func:`source_pixels` mirrors
  :func:`~autodropout.patterns.masks.source_grid` in float64, operation for operation).
  With ``repeat: fill`` every position has ``P = min(size, stride) / stride`` whatever the
  map or transform, so the fraction is ``min(1, size_h/stride) * min(1, size_w/stride)``.
* ``p_tile`` drops each covered cell with probability ``p_tile`` and ``p_apply`` applies the
  whole mask with probability ``p_apply``, both independent of the offsets: the fraction is
  ``p_apply * p_tile * (the tiling's)``.
* Sequence sites: ``axis: tokens`` or ``features`` is the 1-D coverage mean of that axis,
  ``both`` the product of the two axes' (offsets independent; no transform).

``tests/test_space_bounds.py`` checks the formula against the mean of every mask of
:func:`~autodropout.patterns.masks.keep_table` (all offsets, equally likely: exact) and against
masks drawn by ``PatternDropout`` (binomial tolerance).

**Map size.** The fraction of a finite ``repeat`` depends on the plane: a site's
``map_size`` (``28`` or ``[28, 28]``; for sequence sites ``[tokens, features]``), else the
space's top-level ``map_size``, else :data:`DEFAULT_CONV_MAP` (the largest stage of the
shipped WRN on 28x28 inputs) or, for sequence sites, ``[budget.context or 64, 128]`` (the
GPT's default ``d_model``).

**Masking while decoding.** For each site, :func:`site_fractions` tabulates the fraction of
every combination of the choices of the fields it depends on (a few hundred thousand numbers
for the shipped ConvNet space; the choices of other fields, ``share_c``/``residual``/
``share``/``apply_to``, do not change it). A decision is *allowed* given the site's earlier
decisions when some completion of the site's remaining decisions stays within ``max_drop``
(``counts > 0`` in :class:`StepMask`: the number of such completions). So every prefix the
policy can reach has a legal completion, and a pattern decoded under the masks is within
the bound by construction (its own table entry is the only completion at the last step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from autodropout.patterns.fields import CONV, FILL, site_value

DEFAULT_CONV_MAP = (28, 28)
"""The plane a conv site's bound is computed on when the space names none."""

DEFAULT_SEQUENCE_MAP = (64, 128)
"""(tokens, features) for a sequence site when neither the space nor ``budget.context`` says."""

CONV_BOUND_FIELDS = ("size_h", "size_w", "stride", "repeat", "rotate", "shear_x", "shear_y",
                     "p_apply", "p_tile")
SEQUENCE_BOUND_FIELDS = ("size", "stride", "repeat", "axis")
BOUND_FIELDS = {CONV: CONV_BOUND_FIELDS, "sequence": SEQUENCE_BOUND_FIELDS}
"""The fields the expected fraction depends on, in field order."""

TOLERANCE = 1e-9
"""Slack on ``fraction <= max_drop`` for float rounding (a pattern at exactly the bound is in)."""


def _np():
    import numpy

    return numpy


def offset_range(extent: int, size: int, stride: int, repeat: int | str) -> int:
    """As :func:`autodropout.patterns.masks.offset_range` (kept torch-free here)."""
    if repeat == FILL:
        return stride
    return max(stride, extent - ((repeat - 1) * stride + size) + 1)


def axis_coverage(coords, extent: int, size: int, stride: int, repeat: int | str):
    """``P(c covered)`` for each integer coordinate in ``coords`` (numpy array), over the
    uniform offsets of an axis of ``extent`` positions (``tiled``'s rule, exactly)."""
    np = _np()
    offsets = np.arange(offset_range(extent, size, stride, repeat))
    distance = np.asarray(coords)[..., None] - offsets
    tile = np.floor_divide(distance, stride)
    if repeat == FILL:
        covered = distance - tile * stride < size
    else:
        tile = np.minimum(tile, repeat - 1)
        covered = (distance - tile * stride < size) & (tile >= 0)
    return covered.mean(-1)


def source_pixels(height: int, width: int, rotate: float, shear_x: float, shear_y: float):
    """Source (row, column) of every output pixel, flattened row-major, as
    :func:`autodropout.patterns.masks.source_grid` computes them (same float64 operations)."""
    np = _np()
    if not (rotate or shear_x or shear_y):
        rows, cols = np.divmod(np.arange(height * width), width)
        return rows, cols
    y = (height / 2 - (np.arange(height, dtype=np.float64) + 0.5)).reshape(-1, 1)
    x = (np.arange(width, dtype=np.float64) + 0.5 - width / 2).reshape(1, -1)
    angle = math.radians(rotate)
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * x + sin * y
    v = -sin * x + cos * y
    u = u - shear_x * v
    v = v - shear_y * u
    rows = np.floor(height / 2 - v).astype(np.int64).ravel()
    cols = np.floor(u + width / 2).astype(np.int64).ravel()
    return rows, cols


def conv_fraction(site: Mapping, map_size: Sequence[int] = DEFAULT_CONV_MAP) -> float:
    """Expected dropped fraction of one conv site on a ``(height, width)`` map (exact)."""
    height, width = map_size
    rows, cols = source_pixels(height, width, site["rotate"], site["shear_x"], site["shear_y"])
    stride, repeat = site["stride"], site["repeat"]
    p_rows = axis_coverage(rows, height, site["size_h"], stride, repeat)
    p_cols = axis_coverage(cols, width, site["size_w"], stride, repeat)
    tiles = float((p_rows * p_cols).mean())
    return site_value(site, "p_apply") * site_value(site, "p_tile") * tiles


def sequence_fraction(site: Mapping, map_size: Sequence[int] = DEFAULT_SEQUENCE_MAP) -> float:
    """Expected dropped fraction of one sequence site on ``(tokens, features)`` positions; for
    an ``attention_probs`` site pass ``(tokens, tokens)`` (queries, keys)."""
    np = _np()

    def axis(extent: int) -> float:
        coverage = axis_coverage(np.arange(extent), extent, site["size"], site["stride"],
                                 site["repeat"])
        return float(coverage.mean())

    tokens, features = map_size
    if site["axis"] == "tokens":
        return axis(tokens)
    if site["axis"] == "features":
        return axis(features)
    return axis(tokens) * axis(features)


def site_fraction(kind: str, site: Mapping, map_size: Sequence[int]) -> float:
    return (conv_fraction if kind == CONV else sequence_fraction)(site, map_size)


@lru_cache(maxsize=64)
def site_fractions(kind: str, choices: tuple[tuple[Any, ...], ...], map_size: tuple[int, int]):
    """The fraction of every combination of ``choices`` (one tuple per :data:`BOUND_FIELDS`
    field, in order): a numpy array of shape ``[len(c) for c in choices]``, read-only."""
    np = _np()
    if kind != CONV:
        table = np.empty([len(c) for c in choices])
        for index in np.ndindex(*table.shape):
            site = {name: choices[k][i] for k, (name, i) in
                    enumerate(zip(SEQUENCE_BOUND_FIELDS, index))}
            table[index] = sequence_fraction(site, map_size)
        table.setflags(write=False)
        return table
    sizes_h, sizes_w, strides, repeats, rotates, shears_x, shears_y, p_apply, p_tile = choices
    height, width = map_size
    grids = {(a, b, c): source_pixels(height, width, rotate, shear_x, shear_y)
             for a, rotate in enumerate(rotates) for b, shear_x in enumerate(shears_x)
             for c, shear_y in enumerate(shears_y)}
    low_row = min(int(rows.min()) for rows, _ in grids.values())
    low_col = min(int(cols.min()) for _, cols in grids.values())
    row_coords = np.arange(low_row, max(int(rows.max()) for rows, _ in grids.values()) + 1)
    col_coords = np.arange(low_col, max(int(cols.max()) for _, cols in grids.values()) + 1)

    def coverage(coords, extent, sizes):  # (stride, repeat, size, coordinate)
        return np.stack([np.stack([np.stack([axis_coverage(coords, extent, size, stride, repeat)
                                             for size in sizes]) for repeat in repeats])
                         for stride in strides])

    cover_rows, cover_cols = coverage(row_coords, height, sizes_h), coverage(col_coords, width, sizes_w)
    tiles = np.empty([len(c) for c in choices[:7]])
    for (a, b, c), (rows, cols) in grids.items():
        row_values, row_index = np.unique(rows, return_inverse=True)
        col_values, col_index = np.unique(cols, return_inverse=True)
        pairs = np.zeros((len(row_values), len(col_values)))
        np.add.at(pairs, (row_index, col_index), 1.0 / (height * width))  # pixel share per pair
        p_rows = cover_rows[..., row_values - low_row]  # (stride, repeat, size_h, rows)
        p_cols = cover_cols[..., col_values - low_col]  # (stride, repeat, size_w, cols)
        product = p_rows @ pairs @ p_cols.swapaxes(-1, -2)  # (stride, repeat, size_h, size_w)
        tiles[:, :, :, :, a, b, c] = product.transpose(2, 3, 0, 1)
    table = (tiles[..., None, None] * np.asarray(p_apply)[:, None]
             * np.asarray(p_tile)[None, :])
    table.setflags(write=False)
    return table


@dataclass(frozen=True)
class StepMask:
    """The legal choices of one decision given the site's earlier bounded decisions.

    ``prefix`` lists the global steps (token positions) of those earlier decisions and
    ``multipliers`` their row-major weights: the row of ``counts`` for a token sequence is
    ``sum(tokens[p] * m for p, m in zip(prefix, multipliers))``. ``counts[row, choice]`` is
    the number of completions of the site's remaining bounded decisions within the bound
    (0: the choice is masked). ``restricts`` is False when every count is positive.
    """

    prefix: tuple[int, ...]
    multipliers: tuple[int, ...]
    counts: Any  # numpy int32 array (rows, choices)

    @property
    def allowed_table(self):
        return self.counts > 0

    @property
    def restricts(self) -> bool:
        return not bool(self.allowed_table.all())

    def row(self, tokens: Sequence[int]) -> int:
        return sum(int(tokens[p]) * m for p, m in zip(self.prefix, self.multipliers))


@dataclass(frozen=True)
class ChoiceMasks:
    """Per decision of a space (token position), its :class:`StepMask` or ``None`` for a
    decision the bound does not depend on (every choice legal, uniform completion counts)."""

    max_drop: float
    steps: tuple[StepMask | None, ...]

    def allowed(self, step: int, prefix: Sequence[int]) -> list[bool] | None:
        """The legal choices of decision ``step`` after tokens ``prefix`` (None: all)."""
        mask = self.steps[step]
        return None if mask is None else mask.allowed_table[mask.row(prefix)].tolist()

    def weights(self, step: int, prefix: Sequence[int]) -> list[int] | None:
        """Completion counts per choice (proportional to the probability a uniform draw over
        the bounded patterns gives each choice); None: uniform."""
        mask = self.steps[step]
        return None if mask is None else mask.counts[mask.row(prefix)].tolist()


def site_map(space, index: int) -> tuple[int, int]:
    site = space.sites[index]
    if site.map_size is not None:
        return site.map_size
    if space.map_size is not None:
        return space.map_size
    if space.kind == CONV:
        return DEFAULT_CONV_MAP
    context = space.budget.get("context")
    return (context, DEFAULT_SEQUENCE_MAP[1]) if context else DEFAULT_SEQUENCE_MAP


def site_table(space, index: int):
    """The fractions of site ``index``'s bounded choices (:func:`site_fractions`)."""
    fields = BOUND_FIELDS[space.kind]
    choices = tuple(tuple(space.sites[index].choices[name]) for name in fields)
    return site_fractions(space.kind, choices, site_map(space, index))


def choice_masks(space) -> ChoiceMasks | None:
    """The masks of ``space`` (a :class:`~search_spaces.SearchSpace`); None without
    ``max_drop``. Raises ValueError naming the first site with no pattern within the bound."""
    if space.max_drop is None:
        return None
    key = (space.kind, space.max_drop,
           tuple((tuple(site.choices.items()), site_map(space, index))
                 for index, site in enumerate(space.sites)))
    masks = _masks_cache.get(key)
    if masks is None:
        if len(_masks_cache) >= 16:
            _masks_cache.clear()
        masks = _masks_cache[key] = _choice_masks(space)
    return masks


_masks_cache: dict[tuple, ChoiceMasks] = {}
"""Per process, not on the space: a pickled space (sent to every trial) stays small."""


def _choice_masks(space) -> ChoiceMasks:
    np = _np()
    fields = BOUND_FIELDS[space.kind]
    decisions = space.decisions
    steps: list[StepMask | None] = [None] * len(decisions)
    for index, site in enumerate(space.sites):
        feasible = site_table(space, index) <= space.max_drop + TOLERANCE
        if not feasible.any():
            minimum = float(site_table(space, index).min())
            raise ValueError(f"site {site.name!r} has no pattern dropping at most {space.max_drop:g} "
                             f"of a {site_map(space, index)[0]}x{site_map(space, index)[1]} map "
                             f"(the least it drops is {minimum:.3g})")
        bounded = [step for step, d in enumerate(decisions) if d.site == index and d.name in fields]
        counts = feasible.reshape([n for n in feasible.shape if n > 1]).astype(np.int32)
        sizes = counts.shape
        for k, step in enumerate(bounded):
            per_choice = counts.sum(axis=tuple(range(k + 1, counts.ndim))) if k + 1 < counts.ndim \
                else counts
            multipliers = tuple(math.prod(sizes[j + 1:k]) for j in range(k))
            steps[step] = StepMask(prefix=tuple(bounded[:k]), multipliers=multipliers,
                                   counts=per_choice.reshape(-1, sizes[k]))
    return ChoiceMasks(space.max_drop, tuple(steps))


def within(space, pattern) -> bool:
    """Whether every site of ``pattern`` drops at most ``space.max_drop`` (True without one)."""
    if space.max_drop is None:
        return True
    return all(site_fraction(space.kind, site, site_map(space, index)) <= space.max_drop + TOLERANCE
               for index, site in enumerate(pattern.sites))
