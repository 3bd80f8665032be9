"""Regime study: on which CPU-sized proxy does dropout pay, and can a search see it?

A search can only find a pattern that regularises better than fixed dropout if, on its
proxy task, regularisation changes the validation score by more than the noise. This
script measures that before any search uses the proxy:

1. **Proxies** (``--task images``): for each candidate proxy (training-set size, epochs,
   batch size, crop-and-flip augmentation or none, WRN width; validation after the last
   epoch only), train no dropout and each
   fixed family (Dropout, SpatialDropout, DropBlock) at two rates, for ``--seeds`` seeds,
   and score on a validation hold-out of ``--validation`` (default 5,000) images taken from
   the training split (the test split is never read). Every run is scored twice: as
   trained, and after re-estimating BatchNorm statistics with every mask off
   (:func:`workers.training.recalibrate_child`). Per proxy the table gives the paired gap
   (same seeds) of the best fixed regulariser over no dropout, its mean and 95 % t-interval,
   and the CPU-minutes per run; the proxy with the clearest gap per CPU-minute (largest lower
   interval bound per CPU-minute, among proxies whose interval excludes zero) is the choice.
   Picking the best regulariser on the same runs that measure its gap biases the gap up;
   the search's own finals (``benchmarks/search_quality.py``) use new seeds and the test
   split.
2. **Signal against noise** (``--task signal``): in one proxy, ``--patterns`` patterns drawn
   at random from the ``convnet`` space, each trained with the same ``--seeds`` seeds: the
   spread of the per-pattern means against the spread over seeds, and a one-way ANOVA.
   Pattern ``i`` is the ``i``-th draw of a seed-0 random search, so it depends on the space's
   choice lists: the committed runs drew from the space before ``p_tile`` gained 0.05 (the
   best of them is ``benchmarks/reports/transfer/pattern.json``); new runs record their
   pattern's hash.
3. **Language model** (``--task text``): the GPT on PTB at a few token budgets, no dropout
   and Dropout at three rates: training against validation perplexity (does it overfit?),
   and the gap.

Each run appends one JSON line to ``runs.jsonl`` in ``--out``; a rerun skips the runs
already there, so an interrupted study continues where it stopped. ``report.md`` is
rewritten from all runs at the end. Runs go to ``--workers`` processes with one torch
thread each; CPU-minutes are each run's own process CPU time.

    python benchmarks/regime.py --task images [--quick] [--out DIR] [--data-dir DIR]

The proxies, rates and sizes are our choices (the AutoDropout paper gives no CPU proxy);
``--quick`` runs every task at toy size in a few minutes to check the pipeline: its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Proxy:
    """A candidate proxy task: budget overrides of the shipped space, and model arguments."""

    key: str
    title: str
    budget: dict[str, Any]
    model_args: dict[str, Any] = field(default_factory=dict)


IMAGE_PROXIES = (
    Proxy("n1k-e40", "1,000 examples, 40 epochs, batch 32",
          {"train_examples": 1000, "epochs": 40, "batch_size": 32, "augment": "none"},
          {"width": 2}),
    Proxy("n1k-e40-aug", "1,000 examples, 40 epochs, batch 32, crop+flip",
          {"train_examples": 1000, "epochs": 40, "batch_size": 32, "augment": "crop-flip"},
          {"width": 2}),
    Proxy("n1k-e40-w1", "1,000 examples, 40 epochs, batch 32, WRN-10-1",
          {"train_examples": 1000, "epochs": 40, "batch_size": 32, "augment": "none"},
          {"width": 1}),
    Proxy("n2k-e20", "2,000 examples, 20 epochs, batch 32",
          {"train_examples": 2000, "epochs": 20, "batch_size": 32, "augment": "none"},
          {"width": 2}),
)
IMAGE_GRID = ("none", "dropout:0.1", "dropout:0.2", "spatial:0.05", "spatial:0.1",
              "dropblock:0.05:3", "dropblock:0.1:3")
TEXT_PROXIES = (
    Proxy("t100k-e4", "100,000 tokens, 4 epochs", {"train_examples": 100_000, "epochs": 4}),
    Proxy("t50k-e10", "50,000 tokens, 10 epochs", {"train_examples": 50_000, "epochs": 10}),
)
TEXT_GRID = ("none", "dropout:0.1", "dropout:0.2", "dropout:0.3")
QUICK_IMAGE = (Proxy("toy", "toy: 256 examples, 1 epoch",
                     {"train_examples": 256, "epochs": 1, "batch_size": 64,
                      "augment": "crop-flip"}),)
QUICK_TEXT = (Proxy("toy", "toy: 8,192 tokens, 1 epoch",
                    {"train_examples": 8192, "epochs": 1}),)


@dataclass(frozen=True)
class Job:
    """One training run of the study."""

    task: str
    proxy: Proxy
    regularizer: str
    seed: int
    validation: int
    data_dir: str

    @property
    def key(self) -> str:
        return f"{self.task}/{self.proxy.key}/{self.regularizer}/{self.seed}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("images", "signal", "text"), default="images")
    parser.add_argument("--quick", action="store_true", help="toy sizes, for smoke testing")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "reports" / "regime"))
    parser.add_argument("--data-dir", default=str(SHARED_DATA))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--validation", type=int, default=5000,
                        help="validation hold-out from the training split (images)")
    parser.add_argument("--proxies", nargs="*", help="proxy keys to run (default: all)")
    parser.add_argument("--signal-proxy", default="n1k-e40", help="proxy for --task signal")
    parser.add_argument("--patterns", type=int, default=20, help="random patterns for signal")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite report.md from the runs so far, train nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report = render_report(load_runs(out / "runs.jsonl"))
        (out / "report.md").write_text(report, encoding="utf-8")
        print(report)
        return 0
    jobs = plan(args)
    started = time.perf_counter()
    done = run_jobs(jobs, out / "runs.jsonl", args.workers)
    print(f"{len(jobs)} runs ({len(jobs) - done} from an earlier run) in "
          f"{(time.perf_counter() - started) / 60:.1f} min wall clock", flush=True)
    report = render_report(load_runs(out / "runs.jsonl"))
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


def plan(args: argparse.Namespace) -> list[Job]:
    """The study's runs, in the order they are worth having (all proxies' ``none`` first)."""
    validation = 512 if args.quick else args.validation
    if args.task == "signal":
        proxy = next(p for p in (QUICK_IMAGE if args.quick else IMAGE_PROXIES)
                     if args.quick or p.key == args.signal_proxy)
        refs = [f"pattern:{index}" for index in range(3 if args.quick else args.patterns)]
        return [Job("signal", proxy, ref, seed, validation, args.data_dir)
                for seed in range(args.seeds) for ref in refs]
    task = args.task
    proxies = (QUICK_IMAGE if task == "images" else QUICK_TEXT) if args.quick else \
        (IMAGE_PROXIES if task == "images" else TEXT_PROXIES)
    proxies = [p for p in proxies if not args.proxies or p.key in args.proxies]
    grid = IMAGE_GRID if task == "images" else TEXT_GRID
    return [Job(task, proxy, ref, seed, validation, args.data_dir)
            for seed in range(args.seeds) for ref in grid for proxy in proxies]


def run_jobs(jobs: list[Any], path: Path, workers: int, run: Callable[[Any], dict] | None = None,
             describe: Callable[[dict], str] | None = None) -> int:
    """Run the jobs (anything with a ``key``) not yet in ``path`` with ``run`` (default
    :func:`run_job`) in ``workers`` one-thread processes, appending each result as it ends
    and printing ``describe(result)`` (default :func:`summary_of`); returns how many ran."""
    run, describe = run or run_job, describe or summary_of
    finished = {result["key"] for result in load_runs(path)}
    todo = [job for job in jobs if job.key not in finished]
    if not todo:
        return 0
    context = multiprocessing.get_context("fork")
    with context.Pool(max(1, workers), initializer=_worker_setup) as pool, \
            path.open("a", encoding="utf-8") as log:
        for count, result in enumerate(pool.imap_unordered(run, todo), 1):
            log.write(json.dumps(result) + "\n")
            log.flush()
            print(f"[{count}/{len(todo)}] {result['key']}: {describe(result)}", flush=True)
    return len(todo)


def _worker_setup() -> None:
    """One thread per worker, and the default signal handling back: a worker forked after
    ``ray.init`` inherits Ray's handlers, so the pool's SIGTERM would print a stack and
    Ctrl-C would hang the pool instead of ending the run in the parent."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def summary_of(run: dict[str, Any]) -> str:
    metric = "val_perplexity" if run["task"] == "text" else "val_accuracy"
    return (f"{metric} {run[metric]:.4f}, train loss {run['train_loss']:.3f}, "
            f"{run['cpu_seconds'] / 60:.1f} CPU-min")


def run_job(job: Job) -> dict[str, Any]:
    """Train one run and score it (see the module docstring); runs in a worker process."""
    import search_spaces
    from workers.baselines import parse_regularizer
    from workers.datasets import load_dataset, validation_split
    from workers.regularizers import apply_baseline
    from workers.training import Budget, build_child, evaluate_child, recalibrate_child, train_child

    cpu = time.process_time()
    space = search_spaces.load("transformer" if job.task == "text" else "convnet")
    bundle = load_dataset(space.budget["dataset"], job.data_dir, download=False)
    overrides = {**job.proxy.budget, "eval_every": job.proxy.budget["epochs"]}
    if job.task != "text":
        overrides["validation_examples"] = job.validation
    budget = Budget.from_mapping(space.budget, **overrides)
    holdout = validation_split(bundle.train, budget.validation_examples, budget.train_examples)
    model = build_child(budget, bundle, job.seed, job.proxy.model_args)
    pattern, sites = None, None
    if job.regularizer.startswith("pattern:"):
        pattern, sites = random_pattern(space, int(job.regularizer.split(":")[1]))
    else:
        apply_baseline(model, parse_regularizer(job.regularizer))
    last = train_child(model, pattern, sites, holdout, budget, "cpu", job.seed)
    result = {"key": job.key, "task": job.task, "proxy": asdict(job.proxy),
              "regularizer": job.regularizer, "seed": job.seed,
              "parameters": sum(p.numel() for p in model.parameters()), **_scalars(last)}
    result["train_fit"] = _scalars(evaluate_child(model, training_fit(holdout), budget))
    if job.task != "text":
        recalibrate_child(model, holdout, budget)
        result["recalibrated"] = _scalars(evaluate_child(model, holdout, budget))
    result["cpu_seconds"] = time.process_time() - cpu
    result["validations"] = 1  # validated after the last epoch only (eval_every = epochs)
    if pattern is not None:  # "pattern:i" depends on the space's choice lists: keep which
        result["pattern_hash"] = pattern.hash
    return result


def training_fit(holdout: Any, examples: int = 5000, tokens: int = 20_000) -> Any:
    """A hold-out that scores the first training examples (images) or tokens (text): how
    well the model fits what it trained on."""
    train = holdout.train
    if isinstance(train, torch.Tensor):
        return type(holdout)(train, train[:tokens])
    return type(holdout)(train, train.subset(torch.arange(min(len(train), examples))))


def random_pattern(space: Any, index: int) -> tuple[Any, Any]:
    """The ``index``-th pattern of a uniform random search of ``space`` (seed 0)."""
    from controller.controllers import RandomController
    from workers.training import site_selectors

    controller = RandomController(space, seed=0)
    for _ in range(index):
        controller.suggest()
    pattern = controller.suggest().pattern
    return pattern, site_selectors(pattern, space.site_modules)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


# -- report ---------------------------------------------------------------------------------
def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95 % Student-t interval of ``values`` (NaN bounds for fewer than 2)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def render_report(runs: list[dict[str, Any]]) -> str:
    sections = ["# Regime study", ""]
    for task, render in (("images", image_section), ("signal", signal_section),
                         ("text", text_section)):
        mine = [run for run in runs if run["task"] == task]
        if mine:
            sections += [render(mine), ""]
    return "\n".join(sections)


def _by(runs: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(_get(run, key) for key in keys), []).append(run)
    return groups


def _get(run: dict[str, Any], key: str) -> Any:
    return run["proxy"]["key"] if key == "proxy" else run[key]


def paired_gaps(runs: list[dict[str, Any]], metric: Any, baseline: str = "none"
                ) -> dict[str, list[float]]:
    """Per regulariser, ``metric(run) - metric(baseline run)`` for every seed both have."""
    by_seed = {(r["regularizer"], r["seed"]): metric(r) for r in runs}
    gaps: dict[str, list[float]] = {}
    for (ref, seed), value in sorted(by_seed.items()):
        if ref != baseline and (baseline, seed) in by_seed:
            gaps.setdefault(ref, []).append(value - by_seed[baseline, seed])
    return gaps


def image_section(runs: list[dict[str, Any]]) -> str:
    lines = ["## Image proxies (Fashion-MNIST, WRN-10-k, validation hold-out from the training "
             "split)", "",
             "Gap: paired difference in validation accuracy (points) of the best fixed "
             "regulariser over no dropout, mean [95 % t-interval] over seeds; `+BN`: after "
             "re-estimating BatchNorm statistics with masks off (every row alike).", "",
             "| proxy | none | best fixed | gap | best fixed +BN | gap +BN | train loss (none) "
             "| CPU-min/run | lower bound per CPU-min |", "|---|---|---|---|---|---|---|---|---|"]
    for (proxy,), mine in sorted(_by(runs, "proxy").items()):
        lines.append(image_row(proxy, mine))
    lines += ["", "CPU-min/run: process CPU time of a run that validates once, after its last "
              "epoch, as a search trial does; `*`: only runs that validated after every epoch "
              "(40 passes over 5,000 images, about half their time) were timed. Validation is "
              "a pure read, so it changes no result.",
              "", "Every run (validation accuracy, mean over seeds; +BN after re-estimation):", "",
              "| proxy | regulariser | seeds | accuracy | accuracy +BN | train loss |",
              "|---|---|---|---|---|---|"]
    for (proxy, ref), mine in sorted(_by(runs, "proxy", "regularizer").items()):
        lines.append(f"| {proxy} | {ref} | {len(mine)} | "
                     f"{statistics.fmean(r['val_accuracy'] for r in mine):.4f} | "
                     f"{statistics.fmean(r['recalibrated']['val_accuracy'] for r in mine):.4f} | "
                     f"{statistics.fmean(r['train_loss'] for r in mine):.3f} |")
    return "\n".join(lines)


def image_row(proxy: str, runs: list[dict[str, Any]]) -> str:
    cells = [proxy]
    none = [r["val_accuracy"] for r in runs if r["regularizer"] == "none"]
    cells.append(f"{statistics.fmean(none):.4f}" if none else "-")
    bound = math.nan
    for metric in (lambda r: r["val_accuracy"], lambda r: r["recalibrated"]["val_accuracy"]):
        gaps = paired_gaps(runs, metric)
        if not gaps:
            cells += ["-", "-"]
            continue
        best = max(gaps, key=lambda ref: statistics.fmean(gaps[ref]))
        mean, low, high = t_interval([100 * g for g in gaps[best]])
        shown = f"{mean:+.2f} (1 seed)" if math.isnan(low) else f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"
        cells += [best, shown]
        bound = low if math.isnan(bound) else bound
    timed = [r for r in runs if r.get("validations") == 1]
    minutes = statistics.fmean(r["cpu_seconds"] for r in timed or runs) / 60
    loss = [r["train_loss"] for r in runs if r["regularizer"] == "none"]
    cells += [f"{statistics.fmean(loss):.3f}" if loss else "-",
              f"{minutes:.2f}" + ("" if timed else " *"),
              f"{bound / minutes:+.3f}" if not math.isnan(bound) else "-"]
    return "| " + " | ".join(cells) + " |"


def signal_section(runs: list[dict[str, Any]]) -> str:
    from scipy import stats

    groups = _by(runs, "regularizer")
    means = [statistics.fmean(r["val_accuracy"] for r in g) for g in groups.values()]
    within = [statistics.stdev(r["val_accuracy"] for r in g) for g in groups.values() if len(g) > 1]
    samples = [[r["val_accuracy"] for r in g] for g in groups.values() if len(g) > 1]
    anova = stats.f_oneway(*samples) if len(samples) > 1 else None
    proxy = runs[0]["proxy"]["key"]
    lines = [f"## Signal against noise ({len(groups)} random `convnet` patterns, proxy {proxy})",
             "", f"- spread of per-pattern mean accuracy (std over patterns): "
             f"{100 * statistics.pstdev(means):.2f} points",
             f"- spread over seeds of one pattern (mean within-pattern std): "
             f"{100 * statistics.fmean(within):.2f} points" if within else "- one seed only",
             f"- best and worst pattern mean: {100 * max(means):.2f} / {100 * min(means):.2f}"]
    if anova is not None:
        lines.append(f"- one-way ANOVA over patterns: F = {anova.statistic:.2f}, "
                     f"p = {anova.pvalue:.2g}")
    return "\n".join(lines)


def text_section(runs: list[dict[str, Any]]) -> str:
    lines = ["## Language model (PTB, GPT)", "",
             "| proxy | regulariser | seeds | train perplexity | validation perplexity | "
             "gap to none (ppl) [95 % t] | CPU-min/run |", "|---|---|---|---|---|---|---|"]
    for (proxy,), mine in sorted(_by(runs, "proxy").items()):
        gaps = paired_gaps(mine, lambda r: r["val_perplexity"])
        for (ref,), group in sorted(_by(mine, "regularizer").items()):
            gap = "-"
            if ref in gaps:
                mean, low, high = t_interval(gaps[ref])
                gap = f"{mean:+.1f} (1 seed)" if math.isnan(low) else \
                    f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
            lines.append(
                f"| {proxy} | {ref} | {len(group)} | "
                f"{statistics.fmean(r['train_fit']['val_perplexity'] for r in group):.1f} | "
                f"{statistics.fmean(r['val_perplexity'] for r in group):.1f} | {gap} | "
                f"{statistics.fmean(r['cpu_seconds'] for r in group) / 60:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
