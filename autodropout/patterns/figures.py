"""``render``: a picture of a pattern's masks, one row per site (like the paper's figures)."""

from __future__ import annotations

from pathlib import Path

import torch

from autodropout.validation import check_int

from .fields import CONV
from .module import PatternDropout
from .pattern import Pattern

KEPT_COLOUR = "#f0f0f0"
DROPPED_COLOUR = "#c0392b"
PANEL_INCHES = 1.6
DPI = 100


def render(
    pattern: Pattern, shape: tuple[int, ...], path: str | Path, examples: int = 4, seed: int = 0
) -> Path:
    """Draw ``examples`` keep masks of every site of ``pattern`` into a PNG at ``path``.

    ``shape`` is one example's activation shape: (C, H, W) for a conv pattern (the panels
    show channel 0 of different examples) or (T, C) for a sequence pattern (tokens down,
    features across, drawn with the (N, T, C) layout). Kept positions are light grey,
    dropped ones red; the title names the map size, each row the site's parameters. The masks come from
    ``seed`` without touching the global random state. Returns the path.
    """
    shape = _check_shape(shape, pattern.kind)
    examples = check_int(examples, "examples", low=1)
    masks = _masks(pattern, shape, examples, seed)
    figure = _figure(pattern, masks, shape)
    path = Path(path)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _check_shape(shape: object, kind: str) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints of the rank a ``kind`` pattern's example has."""
    rank, layout = (3, "(C, H, W)") if kind == CONV else (2, "(T, C)")
    problem = ValueError(f"shape must be {layout} positive integers for a {kind} pattern, "
                         f"got {shape!r}")
    if not isinstance(shape, (tuple, list)) or len(shape) != rank:
        raise problem
    try:
        return tuple(check_int(n, "shape", low=1) for n in shape)
    except ValueError:
        raise problem from None


def _masks(pattern: Pattern, shape: tuple[int, ...], examples: int, seed: int) -> list:
    """One (examples, rows, cols) boolean keep array per site."""
    x = torch.zeros(examples, *shape)
    masks = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for site in pattern.sites:
            keep = PatternDropout(site, pattern.kind).keep_mask(x).expand_as(x)
            masks.append((keep[:, 0] if pattern.kind == CONV else keep).numpy())
    return masks


def map_size_text(kind: str, shape: tuple[int, ...]) -> str:
    """The map a figure was drawn for, as its title says it: ``"32x32 map, 3 channels"``."""
    if kind == CONV:
        channels, height, width = shape
        return f"{height}x{width} map, {channels} channel{'s' if channels != 1 else ''}"
    tokens, features = shape
    return f"{tokens} tokens x {features} features"


def _figure(pattern: Pattern, masks: list, shape: tuple[int, ...]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    examples = masks[0].shape[0]
    colours = ListedColormap([DROPPED_COLOUR, KEPT_COLOUR])
    figure = Figure(
        figsize=(examples * PANEL_INCHES + 0.4, len(masks) * (PANEL_INCHES + 0.5) + 0.4),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    figure.suptitle(
        f"{pattern.kind} pattern {pattern.hash[:12]} on a {map_size_text(pattern.kind, shape)}: "
        "red = dropped, grey = kept", fontsize=9
    )
    rows = figure.subfigures(len(masks), 1, squeeze=False)[:, 0]
    for index, (row, site_masks) in enumerate(zip(rows, masks)):
        module = PatternDropout(pattern.sites[index], pattern.kind)
        row.suptitle(f"site {index}: {module.extra_repr()}", fontsize=7, wrap=True)
        axes = row.subplots(1, examples, squeeze=False)[0]
        for example, ax in enumerate(axes):
            ax.imshow(site_masks[example], cmap=colours, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"example {example}", fontsize=6)
        axes[0].set_ylabel("row" if pattern.kind == CONV else "token", fontsize=6)
    return figure
