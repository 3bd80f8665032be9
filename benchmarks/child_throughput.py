"""Training throughput of the proxy child: the framework's loop against a bare PyTorch loop.

The proxy child is WRN-10-2 on Fashion-MNIST (1x28x28, the real images from ``--data-dir``),
``--examples`` training examples at batch ``--batch``, SGD with Nesterov momentum and the
convnet space's lr, weight decay and cosine schedule. Rows, interleaved round by round so
that load changes hit every row alike (medians over ``--repeats`` rounds, spread min-max):

* ``bare``: a plain PyTorch loop on the same model and data (images standardised once,
  shuffled once per epoch, no evaluation), without and with the pattern
  (:func:`autodropout.apply_pattern`, a representative ``convnet`` pattern);
* ``train_child``: :func:`workers.training.train_child` without and with the pattern; its
  training time is the sum of the per-epoch ``train_seconds`` it reports (the per-epoch
  validation is timed apart, ``eval_seconds``);
* ``validation``: train_child's per-epoch validation (one no-grad forward of the validation
  examples in batches of :data:`~workers.training.EVAL_BATCH`, or ``CPU_EVAL_BATCH`` on the
  CPU), as examples/s and as a share of an epoch of training;
* extras (``--extras``): the bare loop with channels_last and/or ``torch.compile``.

It also measures the machine's float32 ``torch.mm`` rate and the child's FLOPs per
training sample (``FlopCounterMode`` on a forward, x3 for forward+backward), so the table
says how far from the hardware the child trains. On CUDA, ``--sync-check`` (on by default
there) runs two epochs of the bare loop's and of the framework's training steps (pattern
on) and validation forwards, the second under ``torch.cuda.set_sync_debug_mode("error")``:
any host synchronisation inside them raises (the once-per-epoch loss read is outside).

    python benchmarks/child_throughput.py [--device cpu|cuda] [--threads N] [--repeats 5]
        [--epochs 2] [--extras channels_last,compile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import search_spaces
from autodropout import apply_pattern
from workers import training
from workers.datasets import load_dataset, validation_split
from workers.models import build_model
from workers.training import Budget, site_selectors, train_child

DATA_DIR = str(Path(__file__).resolve().parents[2] / "shared" / "data")
VALIDATION_EXAMPLES = 1000
# a mid-space convnet pattern: 4x3 boxes every 8 pixels (filled), rotated 30 degrees,
# sheared 0.15, shared across channels; per stage, residual on the last stage
PATTERN_CHOICES = dict(size_h=4, size_w=3, stride=8, repeat="fill", rotate=30, shear_x=0.15,
                       shear_y=0.0, share_c=True)
EXTRAS = ("channels_last", "compile")


def representative_pattern():
    space = search_spaces.load("convnet")
    indices = []
    for decision in space.decisions:
        choices = list(decision.choices)
        if decision.name == "residual":
            value = decision.site == space.num_sites - 1
        else:
            value = PATTERN_CHOICES.get(decision.name, choices[0])
        indices.append(choices.index(value) if value in choices else 0)
    return space, space.decode(indices)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """The plain PyTorch loop: what the framework's loop is measured against."""

    def __init__(self, holdout, budget: Budget, device: torch.device,
                 channels_last: bool = False) -> None:
        self.budget, self.device, self.channels_last = budget, device, channels_last
        images = holdout.train.images.to(device).float() / 255
        mean = images.mean(dim=(0, 2, 3), keepdim=True)
        std = images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
        self.images = (images - mean) / std
        if channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = holdout.train.labels.to(device)

    def run(self, model: nn.Module, pattern, sites, seed: int = 0,
            epochs: int | None = None, sync_check: bool = False) -> float:
        """Train ``model`` for ``epochs``; returns the training seconds."""
        budget, device = self.budget, self.device
        epochs = budget.epochs if epochs is None else epochs
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.to(device).train()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=budget.lr, momentum=0.9,
                                    nesterov=True, weight_decay=budget.weight_decay)
        steps = epochs * math.ceil(len(self.labels) / budget.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        handle = apply_pattern(model, pattern, sites) if pattern is not None else None
        step = getattr(model, "compiled_step", None) or model
        synchronize(device)
        started = time.perf_counter()
        try:
            for epoch in range(epochs):
                order = torch.randperm(len(self.labels), generator=generator)
                order = order.to(device, non_blocking=True)
                images, labels = self.images[order], self.labels[order]
                total = torch.zeros((), device=device)
                # the first epoch may set up lazily (mask tables, plans): checked from the second
                with sync_debug(device, sync_check and epoch > 0):
                    for x, y in zip(images.split(budget.batch_size),
                                    labels.split(budget.batch_size)):
                        loss = F.cross_entropy(step(x), y)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        scheduler.step()
                        total += loss.detach()
                if not math.isfinite(float(total)):
                    raise RuntimeError("bare loop diverged")
        finally:
            if handle is not None:
                handle.remove()
        return time.perf_counter() - started


@contextlib.contextmanager
def sync_debug(device: torch.device, on: bool) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` while inside, when ``on`` (CUDA only)."""
    if not on or device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def framework_run(model: nn.Module, pattern, sites, holdout, budget: Budget,
                  device: torch.device, seed: int = 0) -> tuple[float, float, float]:
    """train_child: (training seconds, validation seconds, whole call seconds)."""
    reports: list[dict] = []
    synchronize(device)
    started = time.perf_counter()
    train_child(model, pattern, sites, holdout, budget, device, seed, report=reports.append)
    synchronize(device)
    wall = time.perf_counter() - started
    return (sum(r["train_seconds"] for r in reports), sum(r["eval_seconds"] for r in reports),
            wall)


def framework_sync_check(model: nn.Module, pattern, sites, holdout, budget: Budget,
                         device: torch.device) -> None:
    """An epoch of train_child's own training steps and its validation forwards, then a
    second with any host synchronisation an error (CUDA)."""
    task = training._task_for(holdout, budget, device)
    model.to(device).train()
    optimizer = task.optimizer(model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                           T_max=2 * task.steps_per_epoch)
    handle = apply_pattern(model, pattern, sites) if pattern is not None else None
    generator = torch.Generator().manual_seed(0)
    try:
        with task.layout(model):
            for check in (False, True):  # the first epoch may set up lazily: checked after it
                with sync_debug(device, check):
                    mean_loss = training._train_epoch(model, task, optimizer, scheduler,
                                                      generator)
                    sums = task.validation_sums(model)
                float(mean_loss), sums.tolist()
    finally:
        if handle is not None:
            handle.remove()


def matmul_gflops(device: torch.device, seconds: float = 1.0) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    synchronize(device)
    count, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0:
            synchronize(device)
            elapsed = time.perf_counter() - started
            if elapsed > seconds:
                return 2 * n ** 3 * count / elapsed / 1e9


def flops_per_training_sample(model: nn.Module, device: torch.device, batch: int) -> float:
    x = torch.randn(batch, 1, 28, 28, device=device)
    model = copy.deepcopy(model).to(device).train()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return 3 * counter.get_total_flops() / batch


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--examples", type=int, default=1000, help="training examples")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--extras", default="", help=f"comma-separated: {', '.join(EXTRAS)}")
    parser.add_argument("--sync-check", choices=["auto", "on", "off"], default="auto",
                        help="CUDA: run the training steps once under set_sync_debug_mode('error')"
                        " (auto: on for CUDA)")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    if args.repeats < 1 or args.epochs < 1 or any(e not in EXTRAS for e in extras):
        parser.error(f"--repeats and --epochs must be >= 1; --extras from {EXTRAS}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    device = torch.device(name)

    space, pattern = representative_pattern()
    data = load_dataset("fashion-mnist", args.data_dir)
    holdout = validation_split(data.train, VALIDATION_EXAMPLES, args.examples)
    budget = Budget.from_mapping(space.budget, epochs=args.epochs, train_examples=args.examples,
                                 validation_examples=VALIDATION_EXAMPLES, batch_size=args.batch)
    sites = site_selectors(pattern, space.site_modules)
    base = build_model("wrn", seed=0, num_classes=data.num_classes, in_channels=1)
    fresh = lambda: copy.deepcopy(base)  # noqa: E731
    load_before = load_average()

    if device.type == "cuda" and args.sync_check != "off" or args.sync_check == "on":
        BareLoop(holdout, budget, device).run(fresh(), pattern, sites, epochs=2, sync_check=True)
        framework_sync_check(fresh(), pattern, sites, holdout, budget, device)
        print(f"sync check on {device}: no host synchronisation in the bare loop's or "
              "train_child's training steps, nor in its validation forwards (pattern on)\n")

    bare = BareLoop(holdout, budget, device)
    rows: dict[str, Callable[[], float]] = {
        "bare, no pattern": lambda: bare.run(fresh(), None, None),
        "bare, pattern": lambda: bare.run(fresh(), pattern, sites),
    }
    evals: list[float] = []
    walls: dict[str, list[float]] = {"train_child, no pattern": [], "train_child, pattern": []}

    def framework(label: str, with_pattern: bool) -> Callable[[], float]:
        def run() -> float:
            train, evaluation, wall = framework_run(
                fresh(), pattern if with_pattern else None, sites if with_pattern else None,
                holdout, budget, device)
            evals.append(evaluation / args.epochs)
            walls[label].append(wall)
            return train
        return run

    for label, on in (("train_child, no pattern", False), ("train_child, pattern", True)):
        rows[label] = framework(label, on)
    if "channels_last" in extras:
        last = BareLoop(holdout, budget, device, channels_last=True)
        rows["bare, no pattern, channels_last"] = lambda: last.run(fresh(), None, None)
        rows["bare, pattern, channels_last"] = lambda: last.run(fresh(), pattern, sites)
    if "compile" in extras:
        def compiled() -> float:
            model = fresh()
            model.compiled_step = torch.compile(model)
            return bare.run(model, None, None)
        rows["bare, no pattern, torch.compile (incl. compile)"] = compiled

    # a first, untimed round warms every row (allocator, kernels, oneDNN/cuDNN plans, masks)
    times: dict[str, list[float]] = {label: [] for label in rows}
    for round_index in range(args.repeats + 1):
        for label, run in rows.items():
            seconds = run()
            if round_index:
                times[label].append(seconds)
    evals = evals[2:]
    for values in walls.values():
        del values[0]

    samples = args.epochs * args.examples
    rate = {label: [samples / t for t in ts] for label, ts in times.items()}
    median = {label: statistics.median(r) for label, r in rate.items()}
    gflops = matmul_gflops(device)
    flops = flops_per_training_sample(base, device, args.batch)
    load_after = load_average()

    print(f"Proxy child WRN-10-2, Fashion-MNIST 1x28x28, {args.examples} training examples, "
          f"batch {args.batch}, {args.epochs} epochs per run, on {device} (torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads); median of {args.repeats} "
          f"interleaved rounds after a warm-up round, spread min-max.\n")
    print("| row | training samples/s | spread | vs bare (same pattern) | pattern / no pattern |"
          " child GFLOP/s | of matmul peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label in rows:
        same = "bare, pattern" if "pattern" in label and "no pattern" not in label \
            else "bare, no pattern"
        versus = f"{median[label] / median[same]:.2f}x"
        off = label.replace("pattern", "no pattern") if "no pattern" not in label else None
        pattern_ratio = f"{median[label] / median[off]:.2f}x" if off in median else "-"
        achieved = median[label] * flops / 1e9
        print(f"| {label} | {median[label]:.0f} | {spread(rate[label])} | {versus} | "
              f"{pattern_ratio} | {achieved:.1f} | {achieved / gflops:.1%} |")
    eval_rate = [VALIDATION_EXAMPLES / e for e in evals]
    epoch_train = statistics.median(times["train_child, no pattern"]) / args.epochs
    eval_seconds = statistics.median(evals)
    eval_batch = training.CPU_EVAL_BATCH if device.type == "cpu" else training.EVAL_BATCH
    print(f"| validation (no grad, batch {eval_batch}) | {statistics.median(eval_rate):.0f}"
          f" examples/s | {spread(eval_rate)} | - | - | - | - |")
    print()
    print(f"Validation of {VALIDATION_EXAMPLES} examples per epoch: {eval_seconds * 1e3:.0f} ms, "
          f"{eval_seconds / epoch_train:.1%} of an epoch of training ({epoch_train:.2f} s).")
    for label, values in walls.items():
        print(f"{label}: whole call (setup + training + validation) median "
              f"{statistics.median(values):.2f} s, "
              f"{samples / statistics.median(values):.0f} training samples/s")
    print(f"float32 torch.mm on {device}: {gflops:.0f} GFLOP/s; the child costs "
          f"{flops / 1e6:.1f} MFLOP per training sample (forward x3).")
    print(f"Load average (1/5/15 min) at start: {load_before}; at end: {load_after}.")


if __name__ == "__main__":
    main()
