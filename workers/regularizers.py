"""Fixed dropout baselines written as short references, and where they go in a child model.

A regularizer reference (REF) is either a stored pattern (tag, id, hash prefix or pattern
file; resolved elsewhere) or one of the fixed baselines :func:`parse_regularizer` reads:

=====================  ==========================================================================
``none``               no dropout at all
``dropout:P``          element-wise dropout (Srivastava et al., 2014)
``spatial:P``          whole feature maps (Tompson et al., 2015)
``dropblock:P[:SIZE]`` square blocks of side SIZE, default 7 (Ghiasi, Lin & Le, 2018)
``droppath:P``         residual branches, stochastic depth (Huang et al., 2016)
``gaussian:P``         multiplicative Gaussian noise, dropout's variance (Srivastava et al., 2014)
``jumpout[:PMAX]``     Jumpout, rates 0.01 to PMAX, default 0.6 (Wang, Zhou & Bilmes, 2019)
=====================  ==========================================================================

``P`` is always a drop probability. Placement in the Wide ResNet (what a practitioner
would do, and where the patterns act, so comparisons are fair):

* ``dropout``: the in-block dropout between the two convolutions of every block, as
  Zagoruyko & Komodakis (2016) do; exactly ``WideResNet(dropout=P)``.
* ``spatial``, ``dropblock``, ``gaussian``, ``jumpout``: the outputs of every block's
  ``bn1`` and ``bn2``, the BatchNorm layers the convnet space's patterns act on (the final
  ``bn`` before pooling is not a pattern site either). Each BatchNorm becomes
  ``Sequential(bn, layer)``. A ReLU follows each of them, and for a non-negative mask
  ``relu(x * m) = relu(x) * m`` with the same active units, so this equals dropping after
  BN-ReLU; only Gaussian noise (whose multiplier can be negative) differs.
* ``droppath``: every block's residual branch (``conv2`` becomes ``Sequential(conv2,
  DropPath)``), with the linear depth rule of :func:`~autodropout.layers.drop_path_rates`:
  block ``l`` of ``L`` drops with ``P l / L``.

In the GPT language model ``dropout:P`` sets every dropout slot (embedding, attention
probabilities, attention output, FFN hidden and output), which is ``GPTLanguageModel(dropout=P)``,
and ``gaussian:P`` puts :class:`~autodropout.layers.GaussianDropout` in those slots; the other
families are for ConvNets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from autodropout.errors import BadInput
from autodropout.layers import (
    DropBlock2d,
    DropPath,
    GaussianDropout,
    Jumpout,
    SpatialDropout,
    check_probability,
    drop_path_rates,
)
from autodropout.patterns.files import FILE_SUFFIXES

from .models import GPTLanguageModel, WideBlock, WideResNet

DEFAULT_BLOCK_SIZE = 7
DEFAULT_JUMPOUT_P_MAX = 0.6
JUMPOUT_P_MIN = 0.01
BASELINE_FORMS = (
    "none", "dropout:P", "spatial:P", "dropblock:P[:SIZE]", "droppath:P", "gaussian:P",
    "jumpout[:PMAX]",
)
GPT_FAMILIES = ("none", "dropout", "gaussian")
_WRN_BN_SITES = ("bn1", "bn2")


@dataclass(frozen=True)
class Baseline:
    """A fixed dropout baseline: its ``family``, drop probability ``p`` (Jumpout: the largest
    rate) and, for DropBlock, ``block_size``. ``str()`` is its canonical reference."""

    family: str
    p: float = 0.0
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.family not in _PARSERS:
            raise ValueError(f"family must be one of {', '.join(_PARSERS)}, got {self.family!r}")
        check_probability(self.p)
        if (self.family == "dropblock") != (self.block_size is not None):
            raise ValueError("block_size must be given for dropblock and only for dropblock")

    def __str__(self) -> str:
        if self.family == "none":
            return "none"
        if self.family == "dropblock":
            return f"dropblock:{self.p:g}:{self.block_size}"
        return f"{self.family}:{self.p:g}"


def is_pattern_file(ref: str) -> bool:
    """Whether ``ref`` names a pattern file (an existing file or a pattern-file suffix)."""
    return os.path.isfile(ref) or ref.lower().endswith(FILE_SUFFIXES)


def parse_regularizer(ref: str) -> Baseline | None:
    """The baseline ``ref`` writes, or ``None`` when ``ref`` names a pattern.

    A pattern file, or a word without ``:`` that is no family name, is a pattern reference
    (family names take precedence over tags). Raises :class:`BadInput` for an unknown family
    before ``:`` and for missing, extra or out-of-range numbers.
    """
    ref = ref.strip()
    if is_pattern_file(ref):
        return None
    family, colon, rest = ref.partition(":")
    family = family.lower()
    if family not in _PARSERS:
        if colon:
            raise BadInput(f"regularizer {ref!r}: unknown name {family!r}; a baseline is one of "
                           f"{', '.join(BASELINE_FORMS)}, else give a pattern tag, id, hash prefix "
                           "or file")
        return None
    return _PARSERS[family](ref, rest.split(":") if colon else [])


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


_PARSERS: dict[str, Callable[[str, list[str]], Baseline]] = {
    "none": _none,
    "dropout": _rate_family("dropout"),
    "spatial": _rate_family("spatial"),
    "dropblock": _dropblock,
    "droppath": _rate_family("droppath"),
    "gaussian": _rate_family("gaussian"),
    "jumpout": _jumpout,
}


def check_model(baseline: Baseline, model: str) -> None:
    """Raise :class:`BadInput` unless ``baseline`` applies to the child model ``model``
    (``wide_resnet`` or ``gpt``)."""
    if model == "gpt" and baseline.family not in GPT_FAMILIES:
        raise BadInput(f"regularizer {baseline}: {baseline.family} is for ConvNets; the gpt "
                       "model takes none, dropout:P or gaussian:P")


def apply_baseline(model: nn.Module, baseline: Baseline) -> list[str]:
    """Put ``baseline``'s dropout into ``model`` (a fresh :class:`WideResNet` or
    :class:`GPTLanguageModel`, built without dropout) at the places the module docstring
    gives; returns the names of the modules that changed."""
    if isinstance(model, WideResNet):
        return _apply_to_wide_resnet(model, baseline)
    if isinstance(model, GPTLanguageModel):
        check_model(baseline, "gpt")
        return _apply_to_gpt(model, baseline)
    raise BadInput(f"regularizer {baseline}: baselines go into WideResNet and GPTLanguageModel, "
                   f"not {type(model).__name__}")


def _apply_to_wide_resnet(model: WideResNet, baseline: Baseline) -> list[str]:
    blocks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, WideBlock)]
    changed: list[str] = []
    if baseline.family == "dropout":
        for name, block in blocks:
            block.dropout.p = baseline.p
            changed.append(f"{name}.dropout")
    elif baseline.family == "droppath":
        for (name, block), rate in zip(blocks, drop_path_rates(baseline.p, len(blocks))):
            block.conv2 = nn.Sequential(block.conv2, DropPath(rate))
            changed.append(f"{name}.conv2")
    elif baseline.family != "none":
        for name, block in blocks:
            for site in _WRN_BN_SITES:
                setattr(block, site, nn.Sequential(getattr(block, site), _feature_layer(baseline)))
                changed.append(f"{name}.{site}")
    return changed


def _feature_layer(baseline: Baseline) -> nn.Module:
    if baseline.family == "spatial":
        return SpatialDropout(baseline.p)
    if baseline.family == "dropblock":
        return DropBlock2d(baseline.p, baseline.block_size)
    if baseline.family == "gaussian":
        return GaussianDropout(baseline.p)
    return Jumpout(p_min=min(JUMPOUT_P_MIN, baseline.p), p_max=baseline.p)


def _apply_to_gpt(model: GPTLanguageModel, baseline: Baseline) -> list[str]:
    if baseline.family == "none":
        return []
    slots = [name for name, module in model.named_modules() if isinstance(module, nn.Dropout)]
    for name in slots:
        if baseline.family == "dropout":
            model.get_submodule(name).p = baseline.p
        else:
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, GaussianDropout(baseline.p))
    return slots
