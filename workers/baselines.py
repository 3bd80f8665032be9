"""Fixed dropout baselines written as short references: parsing and checking, no torch.

A regularizer reference (REF) is either a pattern (a tag, id or hash prefix in the store, a
pattern file or a built-in ``builtin:NAME``; resolved elsewhere) or one of the fixed
baselines :func:`parse_regularizer` reads:

=====================  ==========================================================================
``none``               no dropout at all
``dropout:P``          element-wise dropout (Srivastava et al., 2014)
``spatial:P``          whole feature maps (Tompson et al., 2015)
``dropblock:P[:SIZE]`` square blocks of side SIZE, default 7 (Ghiasi, Lin & Le, 2018)
``droppath:P``         residual branches, stochastic depth (Huang et al., 2016)
``gaussian:P``         multiplicative Gaussian noise, dropout's variance (Srivastava et al., 2014)
``jumpout[:PMAX]``     Jumpout, rates 0.01 to PMAX, default 0.6 (Wang, Zhou & Bilmes, 2019)
=====================  ==========================================================================

``P`` is always a drop probability. Where each family goes in a child model is
:mod:`workers.regularizers`'s business; this module imports no torch, so the CLI lists the
forms (:data:`BASELINE_FORMS`) and checks a reference before anything heavy loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from autodropout.builtin import is_builtin_ref
from autodropout.errors import BadInput
from autodropout.patterns.files import is_pattern_file
from autodropout.registry import Registry
from autodropout.validation import check_probability

DEFAULT_BLOCK_SIZE = 7
DEFAULT_JUMPOUT_P_MAX = 0.6
JUMPOUT_P_MIN = 0.01
BASELINE_FORMS = (
    "none", "dropout:P", "spatial:P", "dropblock:P[:SIZE]", "droppath:P", "gaussian:P",
    "jumpout[:PMAX]",
)
GPT_FAMILIES = ("none", "dropout", "gaussian")


@dataclass(frozen=True)
class Baseline:
    """A fixed dropout baseline: its ``family``, drop probability ``p`` (Jumpout: the largest
    rate) and, for DropBlock, ``block_size``. ``str()`` is its canonical reference."""

    family: str
    p: float = 0.0
    block_size: int | None = None

    def __post_init__(self) -> None:
        BASELINES.canonical(self.family, "family")
        check_probability(self.p)
        if (self.family == "dropblock") != (self.block_size is not None):
            raise ValueError("block_size must be given for dropblock and only for dropblock")

    def __str__(self) -> str:
        if self.family == "none":
            return "none"
        if self.family == "dropblock":
            return f"dropblock:{self.p:g}:{self.block_size}"
        return f"{self.family}:{self.p:g}"


def parse_regularizer(ref: str) -> Baseline | None:
    """The baseline ``ref`` writes, or ``None`` when ``ref`` names a pattern.

    A pattern file, a built-in ``builtin:NAME``, or a word without ``:`` that is no family
    name, is a pattern reference (family names take precedence over tags). Raises :class:`BadInput` for an unknown family
    before ``:`` and for missing, extra or out-of-range numbers.
    """
    ref = ref.strip()
    if is_pattern_file(ref) or is_builtin_ref(ref):
        return None
    family, colon, rest = ref.partition(":")
    family = family.lower()
    if family not in BASELINES:
        if colon:
            raise BadInput(f"regularizer {ref!r}: unknown name {family!r}; a baseline is one of "
                           f"{', '.join(BASELINE_FORMS)}, else give a pattern tag, id, hash prefix, "
                           "file or builtin:NAME")
        return None
    return BASELINES.get(family)(ref, rest.split(":") if colon else [])


def _arguments(ref: str, values: list[str], least: int, most: int, form: str) -> list[str]:
    if not least <= len(values) <= most:
        raise BadInput(f"regularizer {ref!r}: expected {form}")
    return values


def _probability(ref: str, text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadInput(f"regularizer {ref!r}: {name} must be a number, got {text!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise BadInput(f"regularizer {ref!r}: {name} must be a probability in [0, 1], got {text}")
    return value


def _rate_family(family: str) -> Callable[[str, list[str]], Baseline]:
    def parse(ref: str, values: list[str]) -> Baseline:
        (rate,) = _arguments(ref, values, 1, 1, f"{family}:P with P the drop probability")
        return Baseline(family, _probability(ref, rate, "P"))

    return parse


_dropout = _rate_family("dropout")
_spatial = _rate_family("spatial")
_droppath = _rate_family("droppath")
_gaussian = _rate_family("gaussian")


def _none(ref: str, values: list[str]) -> Baseline:
    _arguments(ref, values, 0, 0, "none, without arguments")
    return Baseline("none")


def _dropblock(ref: str, values: list[str]) -> Baseline:
    form = "dropblock:P[:SIZE] with P the drop probability and SIZE the block side"
    rate, *size = _arguments(ref, values, 1, 2, form)
    block_size = DEFAULT_BLOCK_SIZE
    if size:
        if not size[0].isdigit() or int(size[0]) < 1:
            raise BadInput(f"regularizer {ref!r}: SIZE must be a positive integer, got {size[0]!r}")
        block_size = int(size[0])
    return Baseline("dropblock", _probability(ref, rate, "P"), block_size)


def _jumpout(ref: str, values: list[str]) -> Baseline:
    p_max = _arguments(ref, values, 0, 1, "jumpout[:PMAX] with PMAX the largest drop rate")
    return Baseline("jumpout", _probability(ref, p_max[0], "PMAX") if p_max
                    else DEFAULT_JUMPOUT_P_MAX)


BASELINES = Registry("family", {
    "none": "workers.baselines:_none",
    "dropout": "workers.baselines:_dropout",
    "spatial": "workers.baselines:_spatial",
    "dropblock": "workers.baselines:_dropblock",
    "droppath": "workers.baselines:_droppath",
    "gaussian": "workers.baselines:_gaussian",
    "jumpout": "workers.baselines:_jumpout",
})
"""Baseline families -> their parsers ``parse(ref, values) -> Baseline``."""


def check_model(baseline: Baseline, model: str) -> None:
    """Raise :class:`BadInput` unless ``baseline`` applies to the child model ``model``
    (``wide_resnet`` or ``gpt``)."""
    if model == "gpt" and baseline.family not in GPT_FAMILIES:
        raise BadInput(f"regularizer {baseline}: {baseline.family} is for ConvNets; the gpt "
                       "model takes none, dropout:P or gaussian:P")
