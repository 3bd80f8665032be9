"""Transfer: does a pattern found on the WRN proxy help another network on another dataset?

A search finds its pattern on a WRN-10-2 trained on Fashion-MNIST. Here that pattern
(``--pattern PATH``, a file as ``autodropout patterns export`` writes it) goes, unchanged,
into a VGG-style BatchNorm ConvNet (:func:`transfer_net`; no residual blocks, so a site's
``residual`` flag has no effect) trained on **MNIST**: both the architecture and the data
change. MNIST rather than another Fashion-MNIST subset because a subset of the search's
own dataset would measure transfer across architectures only, and MNIST's 28x28 images
keep the map sizes (28, 14, 7) each of the pattern's three sites was searched on, so what
changes is what the network learns, not the geometry. The price: MNIST is easier, so the
room for any regulariser is smaller.

The pattern is applied with ``ad.apply_pattern(model, pattern, example_input=...)``: the
three sites go to the network's three stages (runs of BatchNorms with one output size; a
one-site pattern goes to every BatchNorm), every BatchNorm output hooked, as a user would apply an exported pattern to their own model.
It wraps a :func:`workers.training.train_child` call with no pattern of its own (which
leaves the hooks alone), so the recipe is the search's: SGD with Nesterov momentum, the
``convnet`` space's learning rate and weight decay, a cosine schedule, standardised inputs.

Rows, all on the same training examples and the same seeds 0, 1, 2 (so differences pair):
no dropout; the pattern; DropBlock (block 3, after every BatchNorm, where the pattern
acts) at each rate of :data:`DROPBLOCK_GRID`, the rate chosen by mean validation accuracy
on a hold-out of the MNIST training split. Every run is scored on the hold-out and on the
test split; the test split is never used for choosing. The report gives per row the test
accuracy mean, std and 95 % t-interval, the paired test-accuracy differences pattern minus
none and pattern minus tuned DropBlock with 95 % t-intervals, the grid's validation scores
and cost, and CPU-minutes and wall time.

Sizes: 2,000 training and 5,000 validation images, 40 epochs at batch 32 (small data,
long training: an overfitting regime, as in the regime study's WRN proxy), scored on the
whole 10,000-image test split; the net has 32, 64 and 128 channels, 0.29 M parameters, about
the WRN-10-2's 0.30 M. Each run's CPU time is measured and reported (CPU-min/run); the
committed run (``benchmarks/reports/transfer/report.md``, one thread per worker on a 2-core
machine) took 1.5-2.5 CPU-minutes a run, 23.5 CPU-minutes for the 4 x 3 = 12 runs and 24
minutes of wall time with ``--workers 2``. ``--quick`` (512 training images,
2 epochs, 1,000 test images) checks the pipeline in about a minute: its numbers mean nothing.

Each run appends one JSON line to ``runs.jsonl`` in ``--out``; a rerun skips the runs
already there (the pattern's hash is in a run's key, so another pattern trains anew), and
``report.md`` is rewritten from the runs the invocation planned. Runs go to ``--workers``
processes with one torch thread each; CPU-minutes are each run's own process CPU time.

    python benchmarks/transfer.py --pattern PATH [--out DIR] [--data-dir DIR] [--workers 2]
    python benchmarks/transfer.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from regime import load_runs, run_jobs, t_interval
from torch import nn

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
DATASET = "mnist"
SEEDS = (0, 1, 2)
DROPBLOCK_GRID = ("dropblock:0.05:3", "dropblock:0.1:3")
WIDTHS = (32, 64, 128)


@dataclass(frozen=True)
class Size:
    """How much data and training every run of the study gets."""

    train_examples: int
    validation_examples: int
    test_examples: int
    epochs: int
    batch_size: int

    @property
    def key(self) -> str:
        """Names every field, so that runs of another size are never taken for these."""
        return (f"n{self.train_examples}-v{self.validation_examples}-t{self.test_examples}"
                f"-e{self.epochs}-b{self.batch_size}")


FULL = Size(2000, 5000, 10000, 40, 32)
QUICK = Size(512, 512, 1000, 2, 32)


@dataclass(frozen=True)
class Job:
    """One training run: ``row`` is ``none``, ``pattern`` or a DropBlock reference."""

    size: Size
    row: str
    seed: int
    pattern: str
    """The pattern's JSON; its hash is part of the key of a ``pattern`` run."""
    data_dir: str

    @property
    def key(self) -> str:
        row = f"pattern:{json.loads(self.pattern)['hash'][:12]}" if self.row == "pattern" \
            else self.row
        return f"{self.size.key}/{row}/{self.seed}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", help="pattern file found on the WRN proxy (.json, .yaml); "
                        "--quick draws one from the convnet space instead")
    parser.add_argument("--quick", action="store_true", help="toy sizes, for smoke testing")
    parser.add_argument("--out", help="results folder (default: benchmarks/reports/transfer, "
                        "or benchmarks/results/transfer-quick with --quick)")
    parser.add_argument("--data-dir", default=str(SHARED_DATA))
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    args = parser.parse_args(argv)
    if not args.quick and not args.pattern:
        parser.error("--pattern is required (except with --quick)")
    pattern = checked_inputs(args, parser)
    out = Path(args.out or REPO / "benchmarks" / ("results/transfer-quick" if args.quick
                                                  else "reports/transfer"))
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(QUICK if args.quick else FULL, pattern, args.data_dir)
    started = time.perf_counter()
    ran = run_jobs(jobs, out / "runs.jsonl", args.workers, run_job, describe)
    elapsed = time.perf_counter() - started
    keys = {job.key for job in jobs}
    runs = [run for run in load_runs(out / "runs.jsonl") if run["key"] in keys]
    source = args.pattern or "drawn from the convnet space (--quick)"
    report = render_report(runs, f"{source}, hash {json.loads(pattern)['hash'][:12]}",
                           args.quick)
    report += (f"\nThis invocation: {ran} of {len(jobs)} runs trained ({len(jobs) - ran} "
               f"from an earlier one) in {elapsed / 60:.1f} min wall clock, "
               f"{args.workers} workers.\n")
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


def checked_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The pattern's JSON, once the pattern and the data have been read (else a usage error
    naming the flag, before any worker starts)."""
    from autodropout.errors import NotFound
    from workers.datasets import load_dataset

    try:
        pattern = pattern_json(args.pattern)
    except (NotFound, ValueError) as error:
        parser.error(f"--pattern: {error}")
    try:
        load_dataset(DATASET, args.data_dir, download=False)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--data-dir: {error}")
    return pattern


def pattern_json(path: str | None) -> str:
    """The pattern's JSON (with its hash): from ``path``, or without one a fixed pattern of
    the ``convnet`` space (for ``--quick``); checked to map onto :func:`transfer_net`."""
    import autodropout as ad
    import search_spaces

    if path:
        pattern = ad.load_pattern(path)
    else:
        space = search_spaces.load("convnet")
        pattern = space.decode([(3 * i + 1) % len(d.choices)
                                for i, d in enumerate(space.decisions)])
    # the mapping run_job will use: apply_pattern's error says why a pattern does not fit
    ad.apply_pattern(transfer_net(), pattern, example_input=torch.zeros(2, 1, 28, 28)).remove()
    return json.dumps(pattern.to_dict(with_hash=True), sort_keys=True)


def plan(size: Size, pattern: str, data_dir: str) -> list[Job]:
    return [Job(size, row, seed, pattern, data_dir)
            for seed in SEEDS for row in ("none", "pattern", *DROPBLOCK_GRID)]


def describe(result: dict[str, Any]) -> str:
    return (f"validation {result['val_accuracy']:.4f}, test {result['test_accuracy']:.4f}, "
            f"{result['cpu_seconds'] / 60:.2f} CPU-min")


def transfer_net(after_bn: nn.Module | None = None) -> nn.Sequential:
    """The transfer target: three VGG stages (two 3x3 convolution-BatchNorm-ReLU layers
    each, of :data:`WIDTHS` channels; 2x2 max-pooling between stages), global average
    pooling and a linear classifier. ``after_bn`` (a layer, copied for each BatchNorm) goes
    between every BatchNorm and its ReLU."""
    import copy

    layers: list[nn.Module] = []
    channels = 1
    for stage, width in enumerate(WIDTHS):
        layers += [nn.MaxPool2d(2)] if stage else []
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width)]
            layers += [copy.deepcopy(after_bn)] if after_bn is not None else []
            layers.append(nn.ReLU())
            channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def run_job(job: Job) -> dict[str, Any]:
    """Train one run and score it on the hold-out and the test split; runs in a worker."""
    import autodropout as ad
    import search_spaces
    from workers.baselines import parse_regularizer
    from workers.datasets import Holdout, load_dataset, validation_split
    from workers.training import Budget, evaluate_child, train_child

    cpu, wall = time.process_time(), time.perf_counter()
    size = job.size
    bundle = load_dataset(DATASET, job.data_dir, download=False)
    holdout = validation_split(bundle.train, size.validation_examples, size.train_examples)
    # the search's recipe (lr, weight decay) at this study's size; train_child reads no model
    budget = Budget.from_mapping(
        search_spaces.load("convnet").budget, model="vgg-bn", dataset=DATASET,
        epochs=size.epochs, train_examples=size.train_examples,
        validation_examples=size.validation_examples, batch_size=size.batch_size,
        eval_every=size.epochs)
    torch.manual_seed(job.seed)
    baseline = parse_regularizer(job.row) if job.row != "pattern" else None
    model = transfer_net(ad.DropBlock2d(baseline.p, baseline.block_size)
                         if baseline is not None and baseline.family == "dropblock" else None)
    handle = None
    if job.row == "pattern":
        pattern = ad.Pattern.from_json(job.pattern)
        handle = ad.apply_pattern(model, pattern, example_input=holdout.train.images[:2].float())
    try:
        last = train_child(model, None, None, holdout, budget, "cpu", job.seed)
    finally:
        if handle is not None:
            handle.remove()
    test = evaluate_child(model, Holdout(holdout.train, bundle.test.subset(
        torch.arange(size.test_examples))), budget)
    return {"key": job.key, "size": asdict(size), "row": job.row, "seed": job.seed,
            "assignment": handle.assignment if handle is not None else None,
            "val_accuracy": last["val_accuracy"], "train_loss": last["train_loss"],
            "diverged": last["diverged"], "test_accuracy": test["val_accuracy"],
            "cpu_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - wall}


# -- report ---------------------------------------------------------------------------------
def render_report(runs: list[dict[str, Any]], source: str, quick: bool) -> str:
    """The Markdown report of ``runs`` (one study: one size, one pattern)."""
    rows = {row: [run for run in runs if run["row"] == row]
            for row in ("none", "pattern", *DROPBLOCK_GRID)}
    tried = {ref: mine for ref, mine in rows.items() if ref in DROPBLOCK_GRID and mine}
    chosen = max(tried, key=lambda ref: _mean(tried[ref], "val_accuracy")) if tried else None
    size = runs[0]["size"] if runs else asdict(QUICK if quick else FULL)
    lines = [f"# Transfer: a WRN-proxy pattern on a VGG-style BatchNorm net, {DATASET}", ""]
    if quick:
        lines += ["**Quick run at toy size: the numbers mean nothing.**", ""]
    lines += [f"Pattern: {source}. {size['train_examples']:,} training and "
              f"{size['validation_examples']:,} validation images (a hold-out of the training "
              f"split), {size['epochs']} epoch(s) at batch {size['batch_size']}, scored on "
              f"{size['test_examples']:,} test images; seeds {', '.join(map(str, SEEDS))} for "
              "every row.", "",
              "| row | seeds | test accuracy mean | std | 95 % t-interval | validation "
              "accuracy | train loss | CPU-min/run |", "|---|---|---|---|---|---|---|---|"]
    shown = {"none": rows["none"], "pattern": rows["pattern"]}
    if chosen:
        shown[f"DropBlock, tuned ({chosen})"] = rows[chosen]
    lines += [row_line(name, mine) for name, mine in shown.items() if mine]
    if rows["pattern"]:
        assignment = rows["pattern"][0]["assignment"]
        sites = sorted(set(assignment.values()))
        lines += ["", "The pattern's sites on the net's BatchNorms (layer indices): " + "; ".join(
            f"site {site}: {', '.join(n for n, i in assignment.items() if i == site)}"
            for site in sites) + "."]
    lines += ["", "Paired differences of test accuracy (points; same seeds):", "",
              "| comparison | seeds | mean | 95 % t-interval |", "|---|---|---|---|"]
    for name, other in (("pattern - none", rows["none"]),
                        (f"pattern - tuned DropBlock ({chosen or 'no grid run yet'})",
                         rows.get(chosen, []))):
        lines.append(difference_line(name, rows["pattern"], other))
    lines += ["", "DropBlock grid (block 3; the rate with the best mean validation accuracy is "
              "the tuned row, the test split plays no part):", "",
              "| rate | seeds | validation accuracy | CPU-min |", "|---|---|---|---|"]
    lines += [f"| {ref} | {len(mine)} | {_mean(mine, 'val_accuracy'):.4f} | "
              f"{_total(mine, 'cpu_seconds') / 60:.1f} |" for ref, mine in tried.items()]
    grid = [run for mine in tried.values() for run in mine]
    lines += ["", f"Tuning cost: {_total(grid, 'cpu_seconds') / 60:.1f} CPU-min for {len(grid)} "
              f"runs, against {_total(rows['pattern'], 'cpu_seconds') / 60:.1f} for the pattern's "
              "runs (its search's cost is not counted here).",
              f"All {len(runs)} runs: {_total(runs, 'cpu_seconds') / 60:.1f} CPU-min, "
              f"{_total(runs, 'wall_seconds') / 60:.1f} min of run wall time (summed over runs; "
              "runs overlap with several workers)."]
    diverged = [run["key"] for run in runs if run["diverged"]]
    if diverged:
        lines += ["", f"Diverged: {', '.join(diverged)}."]
    return "\n".join(lines) + "\n"


def row_line(name: str, runs: list[dict[str, Any]]) -> str:
    accuracy = [run["test_accuracy"] for run in runs]
    std = f"{statistics.stdev(accuracy):.4f}" if len(accuracy) > 1 else "-"
    return (f"| {name} | {len(runs)} | {statistics.fmean(accuracy):.4f} | {std} | "
            f"{_interval(t_interval(accuracy), '.4f')} | {_mean(runs, 'val_accuracy'):.4f} | "
            f"{_mean(runs, 'train_loss'):.3f} | {_mean(runs, 'cpu_seconds') / 60:.2f} |")


def difference_line(name: str, runs: list[dict[str, Any]], others: list[dict[str, Any]]) -> str:
    """``runs`` minus ``others`` in test accuracy (points), paired by seed."""
    theirs = {run["seed"]: run["test_accuracy"] for run in others}
    gaps = [100 * (run["test_accuracy"] - theirs[run["seed"]]) for run in runs
            if run["seed"] in theirs]
    if not gaps:
        return f"| {name} | 0 | - | - |"
    interval = t_interval(gaps)
    return f"| {name} | {len(gaps)} | {interval[0]:+.2f} | {_interval(interval, '+.2f')} |"


def _interval(interval: tuple[float, float, float], spec: str) -> str:
    _, low, high = interval
    return "-" if low != low else f"[{low:{spec}}, {high:{spec}}]"


def _mean(runs: list[dict[str, Any]], field: str) -> float:
    return statistics.fmean(run[field] for run in runs)


def _total(runs: list[dict[str, Any]], field: str) -> float:
    return sum(run[field] for run in runs)


if __name__ == "__main__":
    raise SystemExit(main())
