"""Train a child model with a dropout pattern applied and score it: no Ray in here.

Recipes (one per child-model family, as in AutoDropout's proxy tasks, Pham & Le 2021):

* image classifiers (WideResNet): SGD with Nesterov momentum 0.9 and weight decay, the
  learning rate following a cosine from ``lr`` to 0 over every step of the budget; inputs
  are the uint8 images scaled to [0, 1] and standardised per channel with the training
  examples' mean and std, once, on the device (each epoch gathers the shuffled examples
  once and steps through views of them). On the CPU the model trains and validates in
  channels_last memory format (oneDNN's faster convolutions; the model is handed back
  contiguous). Reward: validation accuracy.
* language models (GPT): AdamW with weight decay, the same cosine schedule and gradient
  norm clipped at 1; non-overlapping windows of ``context`` tokens. Reward:
  :func:`reward_from_perplexity` of the validation perplexity.

A run whose mean training loss (or validation loss) is not finite, or exceeds
:data:`DIVERGENCE_FACTOR` times the loss of a uniform guess, has diverged: it stops after
that epoch with reward 0, so the controller learns to avoid the pattern. Validation runs
after every ``eval_every``-th epoch, at the epochs a scheduler compares trials (its rungs)
and after the last (and after any epoch whose training loss diverged). The host reads
losses once per epoch; steps never wait on the device (no ``.item()``, no blocking copy),
and validation is one no-grad forward of the validation examples in batches of
:data:`EVAL_BATCH` (:data:`CPU_EVAL_BATCH` for images on the CPU), read back with one
synchronisation. Each epoch's metrics say how its
time split: ``train_seconds`` (the steps), ``eval_seconds`` (validation, and the BatchNorm
recalibration before the last one) and their sum ``epoch_seconds``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autodropout.patterns import CONV, Pattern, apply_pattern
from search_spaces.settings import BUDGET_SETTINGS

from .augment import augment
from .datasets import DatasetBundle, Holdout, Images
from .models import build_model
from .recalibrate import recalibrate_batchnorm
from .registry import MODEL_DATA, MODELS

DIVERGENCE_FACTOR = 10.0
ENAS_PERPLEXITY_SCALE = 80.0
LM_GRAD_CLIP = 1.0
EVAL_BATCH = 512
"""Validation batch on a GPU (and for text): large, one no-grad forward pass."""
CPU_EVAL_BATCH = 128
"""Validation batch of image models on the CPU, where batches of 512 overflow the caches:
WRN-10-2 validates 1.5x faster at 128 than at 512 (channels_last, 1 thread)."""


@dataclass(frozen=True)
class Budget:
    """How a child model is trained: the ``budget:`` section of a search space."""

    model: str
    dataset: str
    epochs: int
    train_examples: int
    validation_examples: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    context: int = 64
    augment: str = "none"
    """Image augmentation of every training batch: ``none`` or ``crop-flip``
    (:mod:`workers.augment`)."""
    recalibrate_bn: bool = False
    """Re-estimate BatchNorm statistics with every mask off before the final validation
    (:mod:`workers.recalibrate`)."""
    width: int | None = None
    """The widening factor ``k`` of a ``wrn`` child (WRN-10-k; None: the model's default, 2)."""
    eval_every: int = 1
    """Validate after every ``eval_every``-th epoch and after the last (Keras's
    ``validation_freq``); validation on 5,000 images costs about as much as a training epoch
    on 1,000, so a search that needs only the final reward saves half its time."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> Budget:
        merged = {**values, **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"budget: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        missing = [f.name for f in fields(cls) if f.name not in merged and f.default is MISSING]
        if missing:
            raise ValueError(f"budget: {missing[0]} is missing")
        optional = {f.name for f in fields(cls) if f.default is None}
        for name, value in merged.items():
            if value is not None or name not in optional:
                BUDGET_SETTINGS[name].check(value, f"budget: {name}")
        return cls(**merged)


def reward_from_perplexity(perplexity: float) -> float:
    """``80 / perplexity``: the reward ENAS gave its language-model controller (Pham et al.
    2018), higher for lower perplexity; 0 for an infinite or undefined perplexity."""
    if not math.isfinite(perplexity) or perplexity <= 0:
        return 0.0
    return ENAS_PERPLEXITY_SCALE / perplexity


def build_child(budget: Budget, data: DatasetBundle, seed: int,
                model_args: Mapping[str, Any] | None = None) -> nn.Module:
    """The budget's child model (a name of :data:`~workers.registry.MODELS`), shaped for
    ``data`` (classes and channels, or vocabulary)."""
    name = MODELS.canonical(budget.model, "budget: model")
    needs = MODEL_DATA[name]
    if data.kind != needs:
        raise ValueError(f"budget: model {budget.model!r} needs a {needs} dataset, "
                         f"got {data.name!r}")
    if name == "gpt":
        shape = {"vocab_size": data.vocab_size, "context": budget.context}
    else:
        shape = {"num_classes": data.num_classes, "in_channels": data.in_channels}
    if budget.width is not None:
        if name != "wrn":
            raise ValueError(f"budget: width is the widening factor of a wrn child; model "
                             f"{budget.model!r} has none")
        shape["width"] = budget.width
    return build_model(name, seed=seed, **{**shape, **(model_args or {})})


def site_selectors(pattern: Pattern, site_modules: Sequence[str | None]) -> dict | None:
    """``sites`` for :func:`apply_pattern` from a space's per-site ``modules:`` globs: site
    ``i`` on every module glob ``i`` matches; ``None`` (apply_pattern's defaults) when the
    space names no modules."""
    if not any(site_modules):
        return None
    if not all(site_modules) or len(site_modules) != len(pattern):
        raise ValueError(f"site_modules must give a glob for each of the pattern's "
                         f"{len(pattern)} sites, got {list(site_modules)}")
    if pattern.kind != CONV:
        raise ValueError("site_modules: per-site module globs are supported for conv patterns "
                         "only; sequence patterns choose modules by sub-layer (apply_to)")
    return dict(enumerate(site_modules))


def train_child(model: nn.Module, pattern: Pattern | None, sites: Any, data: Holdout,
                budget: Budget | Mapping[str, Any], device: torch.device | str = "cpu",
                seed: int = 0, report: Callable[[dict[str, Any]], None] | None = None,
                validate_at: Collection[int] = ()) -> dict[str, Any]:
    """Train ``model`` with ``pattern`` applied at ``sites`` (see :func:`apply_pattern`;
    ``None`` pattern: no dropout) for ``budget.epochs`` epochs on ``data.train``.

    After every ``budget.eval_every``-th epoch, every epoch in ``validate_at`` (a
    scheduler's rungs) and the last, validates on ``data.validation`` and calls
    ``report(metrics)`` with
    ``epoch``, ``epochs``, ``train_loss``, ``val_loss``, ``val_accuracy`` (images) or
    ``val_perplexity`` (text), ``reward``, ``final``, ``diverged``, ``reason``, ``lr`` and
    ``epoch_seconds`` (``train_seconds`` of training steps plus ``eval_seconds`` of
    validation); returns the last metrics. The same seed gives the same run on CPU.
    The pattern is removed from ``model`` at the end.
    """
    budget = budget if isinstance(budget, Budget) else Budget.from_mapping(budget)
    device = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    task = _task_for(data, budget, device)
    with task.layout(model):
        return _train(model, pattern, sites, task, budget, generator, report, set(validate_at))


def _train(model: nn.Module, pattern: Pattern | None, sites: Any, task: _Task, budget: Budget,
           generator: torch.Generator, report: Callable[[dict[str, Any]], None] | None,
           validate_at: set[int]) -> dict[str, Any]:
    optimizer = task.optimizer(model)
    steps = budget.epochs * task.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    handle = apply_pattern(model, pattern, sites) if pattern is not None else None
    try:
        for epoch in range(1, budget.epochs + 1):
            started = time.perf_counter()
            train_loss = float(_train_epoch(model, task, optimizer, scheduler, generator))
            trained = time.perf_counter()
            if not (_validates(epoch, budget, validate_at)
                    or _divergence(train_loss, 0.0, task.chance_loss)):
                continue
            if epoch == budget.epochs and budget.recalibrate_bn:
                task.recalibrate(model)
            metrics = {"epoch": epoch, "epochs": budget.epochs, "train_loss": train_loss,
                       **task.evaluate(model)}
            evaluated = time.perf_counter()
            reason = _divergence(train_loss, metrics["val_loss"], task.chance_loss)
            metrics.update(
                reward=0.0 if reason else task.reward(metrics),
                diverged=bool(reason),
                final=bool(reason) or epoch == budget.epochs,
                reason=reason,
                lr=scheduler.get_last_lr()[0],
                epoch_seconds=evaluated - started,
                train_seconds=trained - started,
                eval_seconds=evaluated - trained,
            )
            if report is not None:
                report(metrics)
            if metrics["final"]:
                break
    finally:
        if handle is not None:
            handle.remove()
    return metrics


def _validates(epoch: int, budget: Budget, validate_at: set[int]) -> bool:
    return epoch % budget.eval_every == 0 or epoch == budget.epochs or epoch in validate_at


@torch.no_grad()
def evaluate_child(model: nn.Module, data: Holdout, budget: Budget | Mapping[str, Any],
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Score ``model`` on ``data.validation`` exactly as :func:`train_child` validates
    (images standardised with ``data.train``'s statistics): ``val_loss`` and
    ``val_accuracy`` (images) or ``val_perplexity`` (text), in eval mode."""
    budget = budget if isinstance(budget, Budget) else Budget.from_mapping(budget)
    was_training = model.training
    task = _task_for(data, budget, torch.device(device))
    with task.layout(model.to(device)):
        metrics = task.evaluate(model)
    model.train(was_training)
    return metrics


def recalibrate_child(model: nn.Module, data: Holdout, budget: Budget | Mapping[str, Any],
                      device: torch.device | str = "cpu") -> None:
    """Re-estimate the BatchNorm statistics of an image model on ``data.train`` (standardised
    as in training, not augmented) with every mask off; see :mod:`workers.recalibrate`."""
    budget = budget if isinstance(budget, Budget) else Budget.from_mapping(budget)
    task = _task_for(data, budget, torch.device(device))
    with task.layout(model.to(device)):
        task.recalibrate(model)


def _task_for(data: Holdout, budget: Budget, device: torch.device) -> _Task:
    return (_ImageTask if isinstance(data.train, Images) else _TextTask)(data, budget, device)


def _train_epoch(model: nn.Module, task: _Task, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler,
                 generator: torch.Generator) -> Tensor:
    """One epoch of training steps; the mean training loss as a device scalar (the steps
    never wait on the device: read it once, after the epoch)."""
    model.train()
    total = torch.zeros((), device=task.device)
    steps = 0
    for inputs, targets in task.batches(generator):
        loss = task.loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if task.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), task.grad_clip)
        optimizer.step()
        scheduler.step()
        total += loss.detach()
        steps += 1
    return total / steps


def _divergence(train_loss: float, val_loss: float, chance_loss: float) -> str:
    """Why the run diverged, or "" if it did not."""
    for name, loss in (("train loss", train_loss), ("validation loss", val_loss)):
        if not math.isfinite(loss):
            return f"{name} is {loss}"
    if train_loss > DIVERGENCE_FACTOR * chance_loss:
        return (f"train loss {train_loss:.4g} exceeds {DIVERGENCE_FACTOR:g} x the loss of a "
                f"uniform guess ({chance_loss:.4g})")
    return ""


class _Task(Protocol):
    """What differs between image classification and language modelling."""

    device: torch.device
    steps_per_epoch: int
    chance_loss: float
    grad_clip: float | None

    def batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]: ...

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor: ...

    def recalibrate(self, model: nn.Module) -> None: ...

    def layout(self, model: nn.Module) -> contextlib.AbstractContextManager[None]: ...

    def validation_sums(self, model: nn.Module) -> Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


class _ImageTask:
    grad_clip = None

    def __init__(self, data: Holdout, budget: Budget, device: torch.device) -> None:
        self.budget, self.device = budget, device
        # channels_last on the CPU: oneDNN's convolutions run the WRN child about 1.2x
        # faster in training and 1.4x in validation there (benchmarks/child_throughput.py)
        cpu = device.type == "cpu"
        self.memory_format = torch.channels_last if cpu else torch.contiguous_format
        self.eval_batch = CPU_EVAL_BATCH if cpu else EVAL_BATCH
        images = data.train.images.to(device)
        scaled = images.float() / 255
        self.mean = scaled.mean(dim=(0, 2, 3), keepdim=True)
        self.std = scaled.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
        # standardised once, not batch by batch: the same values, no per-step work
        self.inputs = ((scaled - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        del scaled
        self.labels = data.train.labels.to(device)
        self.val_inputs = self.standardise(data.validation.images.to(device)).contiguous(
            memory_format=self.memory_format)
        self.val_labels = data.validation.labels.to(device)
        self.steps_per_epoch = math.ceil(len(self.labels) / budget.batch_size)
        num_classes = int(data.train.labels.max()) + 1
        self.chance_loss = math.log(max(num_classes, 2))

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.budget.lr, momentum=0.9,
                               nesterov=True, weight_decay=self.budget.weight_decay)

    def standardise(self, images: Tensor) -> Tensor:
        return (images.float() / 255 - self.mean) / self.std

    def batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        # one gather per epoch, then views: no per-step indexing or standardisation
        order = torch.randperm(len(self.labels), generator=generator)
        order = order.to(self.device, non_blocking=True)
        images = self.inputs[order].contiguous(memory_format=self.memory_format)
        labels = self.labels[order]
        for batch, targets in zip(images.split(self.budget.batch_size),
                                  labels.split(self.budget.batch_size)):
            yield augment(batch, self.budget.augment, generator), targets

    @contextlib.contextmanager
    def layout(self, model: nn.Module) -> Iterator[None]:
        """``model``'s 4-d parameters in :attr:`memory_format` while inside, contiguous after."""
        if self.memory_format == torch.contiguous_format:
            yield
            return
        model.to(memory_format=self.memory_format)
        try:
            yield
        finally:
            model.to(memory_format=torch.contiguous_format)

    def recalibrate(self, model: nn.Module) -> None:
        recalibrate_batchnorm(model, iter(self.inputs.split(self.budget.batch_size)))

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(model(inputs), targets)

    @torch.no_grad()
    def validation_sums(self, model: nn.Module) -> Tensor:
        """(summed loss, correct predictions) on the validation examples, in eval mode, as
        one float64 device tensor: read with a single host synchronisation."""
        model.eval()
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        for images, labels in zip(self.val_inputs.split(self.eval_batch),
                                  self.val_labels.split(self.eval_batch)):
            logits = model(images)
            loss += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
        model.train()
        return torch.stack([loss.double(), correct.double()])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loss, correct = self.validation_sums(model).tolist()
        count = len(self.val_labels)
        return {"val_loss": loss / count, "val_accuracy": int(correct) / count}

    def reward(self, metrics: Mapping[str, float]) -> float:
        return metrics["val_accuracy"]


class _TextTask:
    grad_clip = LM_GRAD_CLIP

    def __init__(self, data: Holdout, budget: Budget, device: torch.device) -> None:
        self.budget, self.device = budget, device
        self.inputs, self.targets = self.windows(data.train, "train_examples")
        self.val_inputs, self.val_targets = self.windows(data.validation, "validation_examples")
        self.steps_per_epoch = math.ceil(len(self.inputs) / budget.batch_size)
        vocab_size = int(torch.maximum(data.train.max(), data.validation.max())) + 1
        self.chance_loss = math.log(max(vocab_size, 2))

    def recalibrate(self, model: nn.Module) -> None:
        """Language models here have no BatchNorm: nothing to re-estimate."""

    def layout(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def windows(self, tokens: Tensor, name: str) -> tuple[Tensor, Tensor]:
        """Non-overlapping (inputs, next-token targets) windows of ``context`` tokens."""
        context = self.budget.context
        count = (len(tokens) - 1) // context
        if count < 1:
            raise ValueError(f"budget: {name} must exceed context ({context}) tokens, "
                             f"got {len(tokens)}")
        tokens = tokens.to(self.device)
        return (tokens[:count * context].view(count, context),
                tokens[1:count * context + 1].view(count, context))

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.budget.lr,
                                 weight_decay=self.budget.weight_decay)

    def batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.inputs), generator=generator)
        order = order.to(self.device, non_blocking=True)
        inputs, targets = self.inputs[order], self.targets[order]
        yield from zip(inputs.split(self.budget.batch_size), targets.split(self.budget.batch_size))

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def validation_sums(self, model: nn.Module) -> Tensor:
        """The summed validation loss, in eval mode, as a float64 device tensor (1,)."""
        model.eval()
        loss = torch.zeros((), device=self.device)
        for inputs, targets in zip(self.val_inputs.split(EVAL_BATCH),
                                   self.val_targets.split(EVAL_BATCH)):
            loss += F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(),
                                    reduction="sum")
        model.train()
        return loss.double().view(1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        val_loss = self.validation_sums(model).item() / self.val_targets.numel()
        perplexity = math.exp(val_loss) if val_loss < 700 else math.inf
        return {"val_loss": val_loss, "val_perplexity": perplexity}

    def reward(self, metrics: Mapping[str, float]) -> float:
        return reward_from_perplexity(metrics["val_perplexity"])
