"""Final evaluation: train a child model with a pattern or a baseline, score it on the test split.

A search only ever sees the training split (with a validation hold-out); the pattern it
finds, and each baseline it is compared with, is then trained here on training examples
(by default the whole training split) and evaluated once per seed on the test split. The
training recipe is the search space's ``budget:`` (optimizer, schedule, batch size,
epochs), run by :func:`workers.training.train_child`. Its per-epoch validation (progress
and divergence checks) scores a fixed part of the *training* examples (:data:`MONITOR`:
fit, not generalisation); the test split is scored once, after the last epoch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from autodropout.errors import BadInput
from autodropout.patterns import Pattern
from autodropout.validation import check_int

from .baselines import Baseline
from .datasets import DatasetBundle, Holdout, Images
from .regularizers import apply_baseline
from .training import Budget, build_child, evaluate_child, site_selectors, train_child

Regularizer = Baseline | Pattern
MONITOR = {"image": 1024, "text": 16384}
"""Training examples (images) or tokens (text) scored after every epoch."""


@dataclass(frozen=True)
class FinalResult:
    """One seed's test score: ``metric`` is ``test_accuracy`` (images) or ``test_perplexity``
    (text); ``diverged`` runs stopped early (see :func:`~workers.training.train_child`)."""

    seed: int
    metric: str
    value: float
    test_loss: float
    epochs: int
    diverged: bool
    seconds: float


def metric_name(bundle: DatasetBundle) -> str:
    return "test_accuracy" if bundle.kind == "image" else "test_perplexity"


def training_subset(train: Images | Tensor, examples: int | None, seed: int = 0) -> Images | Tensor:
    """All of ``train``, or ``examples`` of it: a random subset drawn from ``seed`` for images,
    the first ``examples`` tokens of a token stream."""
    if examples is None:
        return train
    examples = check_int(examples, "examples", low=1, high=len(train))
    if isinstance(train, Tensor):
        return train[:examples]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[:examples])


def train_final(bundle: DatasetBundle, budget: Budget, regularizer: Regularizer, seed: int, *,
                train: Images | Tensor | None = None, site_modules: Sequence[str | None] = (),
                device: torch.device | str = "cpu",
                report: Callable[[dict[str, Any]], None] | None = None) -> FinalResult:
    """Train ``budget.model`` with ``regularizer`` on ``train`` (default: the whole training
    split) and score it on ``bundle.test``.

    A pattern goes to the modules ``site_modules`` names (one glob per site, as a space's
    ``modules:``; empty: :func:`~autodropout.apply_pattern`'s defaults); a baseline to the
    places :mod:`workers.regularizers` gives. ``report`` gets every epoch's metrics, whose
    ``val_*`` entries score the :data:`MONITOR` training examples.
    """
    started = time.perf_counter()
    train = bundle.train if train is None else train
    monitor = training_subset(train, min(len(train), MONITOR[bundle.kind]))
    model = build_child(budget, bundle, seed)
    pattern, sites = None, None
    if isinstance(regularizer, Baseline):
        apply_baseline(model, regularizer)
        check_fits(model, train, str(regularizer))
    else:
        pattern, sites = regularizer, site_selectors(regularizer, site_modules)
    last = train_child(model, pattern, sites, Holdout(train, monitor), budget, device, seed,
                       report)
    test = evaluate_child(model, Holdout(train, bundle.test), budget, device)
    value = test["val_accuracy"] if bundle.kind == "image" else test["val_perplexity"]
    return FinalResult(seed, metric_name(bundle), value, test["val_loss"], last["epoch"],
                       last["diverged"], time.perf_counter() - started)


def check_fits(model: nn.Module, examples: Images | Tensor, ref: str) -> None:
    """Run one example through ``model`` in eval mode (no state changes) so that a layer that
    does not fit the feature maps, e.g. a DropBlock larger than a map, fails now and clearly."""
    sample = examples.images[:1].float() if isinstance(examples, Images) else examples[:2][None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except ValueError as error:
        raise BadInput(f"regularizer {ref}: {error}") from None
    finally:
        model.train(was_training)


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN where there are too few values)."""
    mean = statistics.fmean(values) if values else math.nan
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan
