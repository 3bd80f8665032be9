"""Search quality: do searched dropout patterns beat tuned fixed dropout, and RL beat random?

For each task (Fashion-MNIST with the CPU-sized WRN-10-2 on a training subset small enough
to overfit; PTB with the GPT language model, smaller):

1. Baselines: no dropout, and each dropout family at its best rate from a small grid; every
   grid run trains the search's child model with the search's budget on the search's
   training examples and is scored on the same validation hold-out (the grid's cost counts
   in the reported budget). Baselines sit where :mod:`workers.regularizers` puts them.
2. Search: the RL and the random controller, through ``controller.service.run_search`` on a
   local Ray with the run's own pattern store, with the same trials, epochs per trial and
   search seeds, one trial at a time on all cores; best-so-far validation score against
   trials for both goes to a PNG.
3. Final training of each search's best pattern (best over its seeds) and of each tuned
   baseline, on the same training examples for ``final_epochs``, for several seeds, scored on
   the test split (which steps 1-2 never see). Every result is stored as a final evaluation.

The report (``results.md``, ``results.json``, ``<task>-search.png``, next to the pattern
store ``store.db`` with every trial and final evaluation, in ``--out``) has per
row the test metric's mean and sample standard deviation, the validation score that chose
the row, and the CPU-hours spent choosing it (grid or search) and training it finally;
then RL against random: best-so-far after N trials, mean and std over search seeds, and
the paired difference (the same seed gives both controllers the same training seed).
CPU-hours are wall-clock hours times the cores given to the work (torch threads in the
driver; ``cpus_per_trial`` with one trial at a time in Ray), every stage using all cores.

    python benchmarks/search_quality.py [--quick] [--out DIR] [--data-dir DIR] [--tasks ...]

The full run is sized for a 2-core CPU machine in under 2 hours (110 minutes measured on an idle
one; a loaded machine is slower, so the run prints the time it took). Its Fashion-MNIST task
trains 15 epochs on 1,000 examples at batch 32 because dropout can only help a model that
overfits: at that size training loss falls to about 0.1 while validation accuracy levels
off, whereas the few epochs on 5,000 examples this CPU affords per trial leave the WRN
underfit, and there every dropout rate lowered validation accuracy. ``--quick`` runs the
whole pipeline at toy size (tiny subsets, one epoch, a few trials) in a few minutes, to
check that it works: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import search_spaces
from autodropout.patterns import Pattern
from workers.baselines import Baseline, parse_regularizer
from workers.datasets import DatasetBundle, load_dataset, validation_split
from workers.final import summarize, train_final, training_subset
from workers.regularizers import apply_baseline
from workers.training import ENAS_PERPLEXITY_SCALE, Budget, build_child, train_child

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
CONTROLLERS = ("rl", "random")
SEED_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Task:
    """One experiment: a shipped space, the budget changes for its trials and grid runs, the
    baseline grid, and the sizes of the searches and the final training."""

    key: str
    title: str
    space: str
    dataset: str
    budget: dict[str, Any]
    grid: tuple[str, ...]
    trials: int
    search_seeds: int
    final_epochs: int
    final_seeds: int
    test_examples: int | None = None
    """None: the whole test split; ``--quick`` scores on a head of it."""

    @property
    def is_text(self) -> bool:
        return self.space == "transformer"

    @property
    def metric(self) -> str:
        return "perplexity" if self.is_text else "accuracy"

    def is_better(self, value: float, than: float) -> bool:
        return value < than if self.is_text else value > than

    def best_of(self, items: list, value):
        """The item whose ``value(item)`` scores best (first among ties)."""
        return (min if self.is_text else max)(items, key=value)

    def score(self, reward: float) -> float:
        """The validation metric behind a reward: accuracy, or perplexity ``80 / reward``."""
        if not self.is_text:
            return reward
        return ENAS_PERPLEXITY_SCALE / reward if reward > 0 else math.inf


IMAGE_GRID = ("none", "dropout:0.1", "dropout:0.3", "spatial:0.1", "spatial:0.2",
              "dropblock:0.1:3", "dropblock:0.2:3")
FULL = (
    Task("fashion-mnist", "Fashion-MNIST, WRN-10-2, 1,000 training examples", "convnet",
         "fashion-mnist", {"train_examples": 1000, "validation_examples": 1000, "epochs": 15,
                           "batch_size": 32, "width": 2},
         IMAGE_GRID, trials=10, search_seeds=2, final_epochs=15, final_seeds=3),
    Task("ptb", "PTB, GPT (2 layers, 128 wide), 100,000 training tokens", "transformer", "ptb",
         {"train_examples": 100_000, "validation_examples": 20_000, "epochs": 1},
         ("none", "dropout:0.1", "dropout:0.2", "dropout:0.3"),
         trials=6, search_seeds=1, final_epochs=2, final_seeds=3),
)
QUICK = (
    Task("fashion-mnist", "Fashion-MNIST, WRN-10-2, toy: 512 training examples", "convnet",
         "fashion-mnist", {"train_examples": 512, "validation_examples": 256, "epochs": 1,
                           "width": 2},
         ("none", "dropout:0.1", "dropout:0.3", "spatial:0.1", "dropblock:0.1:3"),
         trials=3, search_seeds=2, final_epochs=1, final_seeds=2, test_examples=1000),
    Task("ptb", "PTB, GPT (2 layers, 128 wide), toy: 16,384 training tokens", "transformer",
         "ptb", {"train_examples": 16_384, "validation_examples": 4096, "epochs": 1},
         ("none", "dropout:0.1"), trials=2, search_seeds=1, final_epochs=1, final_seeds=2,
         test_examples=8192),
)


@dataclass
class GridRun:
    ref: str
    family: str
    validation: float
    seconds: float


@dataclass
class SearchRun:
    controller: str
    seed: int
    name: str
    validation: list[float | None]
    best_hash: str | None
    best_validation: float | None
    seconds: float

    def best_so_far(self, better) -> list[float]:
        best, curve = math.nan, []
        for value in self.validation:
            if value is not None and (math.isnan(best) or better(value, best)):
                best = value
            curve.append(best)
        return curve


@dataclass
class Row:
    method: str
    subject: str
    validation: float
    tuning_seconds: float
    regularizer: Baseline | Pattern
    test: list[float] = field(default_factory=list)
    final_seconds: float = 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, for smoke testing")
    parser.add_argument("--out", help="results folder (default: benchmarks/results/"
                        "search_quality, or a temporary folder with --quick)")
    parser.add_argument("--data-dir", default=os.environ.get("AUTODROPOUT_DATA_DIR")
                        or (str(SHARED_DATA) if SHARED_DATA.is_dir() else None),
                        help="dataset folder (default: $AUTODROPOUT_DATA_DIR or ../shared/data)")
    parser.add_argument("--tasks", nargs="+", choices=[t.key for t in FULL],
                        default=[t.key for t in FULL])
    args = parser.parse_args(argv)

    started = time.perf_counter()
    out = Path(args.out or (tempfile.mkdtemp(prefix="search-quality-") if args.quick
                            else REPO / "benchmarks" / "results" / "search_quality"))
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    db = f"sqlite:///{out / 'store.db'}"
    tasks = [t for t in (QUICK if args.quick else FULL) if t.key in args.tasks]
    print(f"search quality{' (quick)' if args.quick else ''}: {', '.join(args.tasks)}; "
          f"{threads} cores; results in {out}", flush=True)
    start_ray(threads)
    sections, raw = [], {}
    for task in tasks:
        section, raw[task.key] = run_task(task, args.data_dir, out, db, threads)
        sections.append(section)
    elapsed = time.perf_counter() - started
    footer = (f"Total wall-clock time: {elapsed / 60:.1f} min on {threads} cores "
              f"({'quick, toy sizes' if args.quick else 'full run'}).")
    report = "\n\n".join([*sections, footer]) + "\n"
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"elapsed_seconds": elapsed, "cores": threads,
                                                  "quick": args.quick, "tasks": raw}, indent=2))
    print("\n" + report, end="")
    print(f"took {elapsed:.0f} s; wrote {out / 'results.md'}")
    return 0


def start_ray(threads: int) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)


def run_task(task: Task, data_dir: str | None, out: Path, db: str,
             threads: int) -> tuple[str, dict[str, Any]]:
    print(f"\n== {task.title}", flush=True)
    space, space_path = derived_space(task, out)
    budget = Budget.from_mapping(space.budget)
    bundle = load_dataset(task.dataset, data_dir)
    if task.test_examples is not None:
        bundle = dataclasses.replace(bundle, test=training_subset(bundle.test, task.test_examples))
    holdout = validation_split(bundle.train, budget.validation_examples, budget.train_examples)

    grid = [run_grid_point(task, ref, bundle, holdout, budget) for ref in task.grid]
    with tempfile.TemporaryDirectory(prefix="tune-") as experiments:
        searches = [run_one_search(task, controller, seed, space_path, data_dir,
                                   Path(experiments), db, threads)
                    for controller in CONTROLLERS for seed in range(task.search_seeds)]
    rows = choose_rows(task, grid, searches, db, threads)
    final_budget = dataclasses.replace(budget, epochs=task.final_epochs)
    for row in rows:
        run_finals(task, row, bundle, holdout.train, final_budget, space.site_modules, db, threads)
    plot_search(task, searches, out / f"{task.key}-search.png")
    section = markdown(task, budget, len(bundle.test), grid, searches, rows, threads,
                       f"{task.key}-search.png")
    raw = {
        "budget": dataclasses.asdict(budget),
        "final_epochs": task.final_epochs,
        "test_examples": len(bundle.test),
        "grid": [dataclasses.asdict(g) for g in grid],
        "searches": [dataclasses.asdict(s) for s in searches],
        "rows": [{"method": r.method, "subject": r.subject, "validation": r.validation,
                  "test": r.test, "tuning_seconds": r.tuning_seconds,
                  "final_seconds": r.final_seconds} for r in rows],
    }
    return section, raw


def derived_space(task: Task, out: Path):
    """The shipped space with the task's budget: same name, sites and decisions."""
    shipped = search_spaces.loader.resolve(task.space)
    data = yaml.safe_load(shipped.read_text())
    data["budget"] = {**data["budget"], "dataset": task.dataset, **task.budget}
    path = out / f"{task.key}-space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return search_spaces.load(path), path


def run_grid_point(task: Task, ref: str, bundle: DatasetBundle, holdout, budget: Budget) -> GridRun:
    """One baseline at one rate, trained like a search trial (seed 0) and validated."""
    started = time.perf_counter()
    baseline = parse_regularizer(ref)
    model = build_child(budget, bundle, 0, {})
    apply_baseline(model, baseline)
    metrics = train_child(model, None, None, holdout, budget, seed=0)
    run = GridRun(str(baseline), baseline.family, task.score(metrics["reward"]),
                  time.perf_counter() - started)
    print(f"grid {run.ref}: validation {task.metric} {run.validation:.4f} ({run.seconds:.0f} s)",
          flush=True)
    return run


def run_one_search(task: Task, controller: str, seed: int, space_path: Path,
                   data_dir: str | None, experiments: Path, db: str, threads: int) -> SearchRun:
    from controller.service import SearchOptions, run_search
    from patterns_db import PatternStore

    name = f"{task.key}-{controller}-seed{seed}"
    result = run_search(SearchOptions(
        space=str(space_path), trials=task.trials, concurrent=1, controller=controller,
        db=db, name=name, seed=seed, data_dir=data_dir, cpus_per_trial=threads,
        experiments_dir=str(experiments), progress=False,
    ))
    with PatternStore(db) as store:
        trials = store.trials(name, with_metrics=False)
    validation = [None if t.reward is None else task.score(t.reward) for t in trials]
    best = None if result.best_reward is None else task.score(result.best_reward)
    run = SearchRun(controller, seed, name, validation, result.best_hash, best, result.elapsed)
    shown = "-" if best is None else f"{best:.4f}"
    print(f"search {name}: {result.status}, {len(trials)} trials, best validation "
          f"{task.metric} {shown} ({run.seconds:.0f} s)", flush=True)
    return run


def choose_rows(task: Task, grid: list[GridRun], searches: list[SearchRun], db: str,
                threads: int) -> list[Row]:
    """Each controller's best pattern over its seeds, "none", and each family's best rate."""
    from patterns_db import PatternStore

    rows = []
    for controller in CONTROLLERS:
        runs = [s for s in searches if s.controller == controller and s.best_hash]
        if not runs:
            print(f"{controller}: no completed trial, no row", flush=True)
            continue
        best = task.best_of(runs, lambda run: run.best_validation)
        with PatternStore(db) as store:
            pattern = store.resolve(best.best_hash).pattern
        cost = sum(s.seconds for s in searches if s.controller == controller)
        rows.append(Row(f"{controller} search", f"pattern {best.best_hash[:12]}",
                        best.best_validation, cost * threads, pattern))
    for family in dict.fromkeys(g.family for g in grid):
        runs = [g for g in grid if g.family == family]
        best = task.best_of(runs, lambda run: run.validation)
        tuning = 0.0 if family == "none" else sum(g.seconds for g in runs) * threads
        rows.append(Row(family if family == "none" else f"{family} (tuned)", best.ref,
                        best.validation, tuning, parse_regularizer(best.ref)))
    return rows


def run_finals(task: Task, row: Row, bundle: DatasetBundle, train, budget: Budget,
               site_modules, db: str, threads: int) -> None:
    from patterns_db import PatternStore

    link = ({"baseline": str(row.regularizer)} if isinstance(row.regularizer, Baseline)
            else {"pattern": row.regularizer})
    for seed in range(task.final_seeds):
        result = train_final(bundle, budget, row.regularizer, seed, train=train,
                             site_modules=site_modules)
        row.final_seconds += result.seconds * threads
        if math.isfinite(result.value):
            row.test.append(result.value)
            with PatternStore(db) as store:
                store.add_final_evaluation(task.dataset, budget.model, seed, result.metric,
                                           result.value, **link)
        print(f"final {row.method} [{row.subject}] seed {seed}: {result.metric} "
              f"{result.value:.4f} ({result.seconds:.0f} s)", flush=True)


def plot_search(task: Task, searches: list[SearchRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(6, 4))
    for controller, color in zip(CONTROLLERS, ("tab:red", "tab:blue")):
        for search in (s for s in searches if s.controller == controller):
            curve = search.best_so_far(task.is_better)
            axes.plot(range(1, len(curve) + 1), curve, color=color,
                      linestyle=SEED_STYLES[search.seed % len(SEED_STYLES)], marker="o",
                      markersize=3, label=f"{controller}, seed {search.seed}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("trial")
    axes.set_ylabel(f"best validation {task.metric} so far")
    axes.set_title(task.title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(task: Task, budget: Budget, test_examples: int, grid: list[GridRun],
             searches: list[SearchRun], rows: list[Row], threads: int, png: str) -> str:
    hours = 3600.0
    unit = "tokens" if task.is_text else "examples"
    lines = [
        f"### {task.title}",
        "",
        f"Trials and grid runs: {budget.epochs} epoch(s) on {budget.train_examples} training "
        f"{unit}, validated on {budget.validation_examples} held out; {task.trials} trials per "
        f"search, {task.search_seeds} search seed(s) per controller. Final: {task.final_epochs} "
        f"epoch(s) on the same training {unit}, {task.final_seeds} seeds, scored on "
        f"{test_examples} test {unit}.",
        "",
        f"| method | chosen | validation {task.metric} | test {task.metric} (mean ± std) "
        "| choosing (CPU-h) | final (CPU-h) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        mean, std = summarize(row.test)
        spread = "n/a" if math.isnan(std) else f"{std:.4f}"
        lines.append(f"| {row.method} | {row.subject} | {row.validation:.4f} | {mean:.4f} ± "
                     f"{spread} (n={len(row.test)}) | {row.tuning_seconds / hours:.3f} | "
                     f"{row.final_seconds / hours:.3f} |")
    grid_hours = sum(g.seconds for g in grid) * threads / hours
    search_hours = sum(s.seconds for s in searches) * threads / hours
    lines += ["", f"Whole grid (including `none`): {grid_hours:.3f} CPU-h; all searches: "
              f"{search_hours:.3f} CPU-h.", "", rl_against_random(task, searches), "",
              f"![best-so-far validation {task.metric} against trials]({png})"]
    return "\n".join(lines)


def rl_against_random(task: Task, searches: list[SearchRun]) -> str:
    """Best-so-far after N trials per controller over seeds, and the paired difference."""
    curves = {c: {s.seed: s.best_so_far(task.is_better) for s in searches if s.controller == c}
              for c in CONTROLLERS}
    checkpoints = sorted({max(1, task.trials // 4), max(1, task.trials // 2), task.trials})
    lines = [f"RL against random, best validation {task.metric} after N trials "
             f"({task.search_seeds} seed(s) each; difference paired by seed, RL minus random):",
             "", "| N | RL mean ± std | random mean ± std | RL - random mean ± std |",
             "|---:|---:|---:|---:|"]
    for n in checkpoints:
        values = {c: {seed: curve[n - 1] for seed, curve in curves[c].items() if len(curve) >= n}
                  for c in CONTROLLERS}
        differences = [values["rl"][seed] - values["random"][seed]
                       for seed in values["rl"].keys() & values["random"].keys()]
        cells = [format_spread(list(values["rl"].values())),
                 format_spread(list(values["random"].values())), format_spread(differences)]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    mean, std = summarize(finite)
    return f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")


if __name__ == "__main__":
    sys.exit(main())
