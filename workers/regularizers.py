"""Where the fixed dropout baselines go in a child model.

The baselines are the references :mod:`workers.baselines` parses (``dropout:P``,
``spatial:P``, ...). Placement in the Wide ResNet (what a practitioner
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

from torch import nn

from autodropout.errors import BadInput
from autodropout.layers import (
    DropBlock2d,
    DropPath,
    GaussianDropout,
    Jumpout,
    SpatialDropout,
    drop_path_rates,
)

from .baselines import JUMPOUT_P_MIN, Baseline, check_model
from .models import GPTLanguageModel, WideBlock, WideResNet

_WRN_BN_SITES = ("bn1", "bn2")


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
