"""The name tables of the workers: child models and datasets (baseline families live with
their parsers in :mod:`workers.baselines`).

Each is an :class:`~autodropout.registry.Registry`: listing the names imports nothing (no
torch), an implementation is imported on first use, and an unknown name is the one
``"FIELD must be one of [...]"`` :class:`~autodropout.errors.BadInput` error.
"""

from __future__ import annotations

from autodropout.registry import Registry

MODELS = Registry(
    "--model",
    {"wrn": "workers.models:WideResNet", "gpt": "workers.models:GPTLanguageModel"},
    aliases={"wide_resnet": "wrn"},
)
"""Child models: ``wrn`` (alias ``wide_resnet``: :class:`~workers.models.WideResNet`, images)
and ``gpt`` (:class:`~workers.models.GPTLanguageModel`, text)."""

MODEL_DATA = {"wrn": "image", "gpt": "text"}
"""The kind of dataset each child model trains on."""

DATASETS = Registry("--dataset", {
    "fashion-mnist": "workers.datasets:_load_idx",
    "mnist": "workers.datasets:_load_idx",
    "cifar-10": "workers.datasets:_load_cifar10",
    "ptb": "workers.datasets:_load_text",
    "wikitext-2": "workers.datasets:_load_text",
    "synthetic": "workers.datasets:_load_synthetic",
    "synthetic-text": "workers.datasets:_load_synthetic_text",
})
"""Dataset loaders ``loader(name, data_dir, download, mirror) -> DatasetBundle``; see
:func:`workers.datasets.load_dataset`."""

MODEL_SPACES = {"wrn": "convnet", "gpt": "transformer"}
"""The shipped search space whose budget (and sites) a child model trains with by default."""

MODEL_PATTERNS = {"wrn": "conv", "gpt": "sequence"}
"""The kind of pattern each child model takes."""
