"""Search quality: do searched dropout patterns beat tuned fixed dropout, and RL beat random?

On the proxy the regime study chose (``benchmarks/reports/regime``; the shipped spaces'
default budgets), for each task (Fashion-MNIST with the WRN-10-1 on 1,000 training images;
PTB with the GPT language model, at a smaller scale):

1. **Grid**: no dropout, and Dropout, SpatialDropout, DropBlock (block 3) and Jumpout at
   three rates each (Jumpout: ``jumpout:PMAX``, whose half-normal width ``sigma`` is
   ``PMAX / 2``, so the grid over PMAX is the grid over sigma), for ``grid_seeds`` seeds,
   trained like a search trial and scored on the search's validation hold-out; each family's
   rate with the best mean validation score is its tuned row. The grid's CPU time counts in
   the tuned rows' cost.
2. **Searches**: the RL and the random controller, ``search_seeds`` seeds each (run in the
   order rl-0, random-0, rl-1, ... so that a partial run compares like with like), the same
   number of trials, through :func:`controller.service.run_search` with ASHA on a local Ray
   (two trials at a time, one CPU each), every trial in the run's own pattern store.
   A search's candidates are its *completed* (full-budget) trials; its winner is the best of
   them, and each controller's row is its best winner over its seeds.
3. **Finals**: every row (each controller's winner, no dropout, each tuned family) trained
   with ``final_seeds`` new seeds (100, 101, ...) on the same training examples and scored
   once on the whole test split, which nothing before has read.

The report (``results.md``, ``results.json``, ``<task>-search.png`` in ``--out``) has per
row the test mean and std, the validation score that chose it and the CPU-hours spent
choosing and training it; the paired differences (same final seeds) of each searched row
against the best tuned baseline (chosen by validation) and against no dropout, with 95 %
t-intervals; RL against random as best-so-far curves over trials and over CPU-hours (mean
and min-max band over seeds) and the mean reward of each search's last 20 trials with its
interval. CPU time: grid and final runs are one-thread processes (``--workers`` at a time)
measured by their own process CPU time; a search trial counts its duration times its one
CPU. Wall time is printed per stage and in total.

**Resumable**: grid and final runs append to ``runs.jsonl`` and searches live in
``store.db`` (with Ray Tune's experiment folders in ``experiments/``; neither is committed),
all in ``--out``; a rerun skips finished runs, resumes an unfinished search by name and
reuses finished ones, from ``results.json`` (which keeps every trial and each winner's
pattern) where the store is gone. ``--tasks`` picks the tasks to train; the report always
covers every task that has run.
A search that ends without completing (Ctrl-C, or too many failed trials) stops the run
with exit status 1 and no rows from it. Each invocation's wall time goes to
``invocations.jsonl``; the report's total is their sum.

    python benchmarks/search_quality.py [--quick] [--out DIR] [--data-dir DIR] [--tasks ...]
    python benchmarks/search_quality.py --report-only  # the report from what has run so far
    python benchmarks/search_quality.py --ship         # the winners into autodropout/builtin

Sizes are our choices (the AutoDropout paper's search budget is far beyond this machine),
sized for 150 minutes on the 2-core machine that measured the regime study (0.4 CPU-min per
no-dropout run). The committed run's machine trained 2.7x slower (1.1 CPU-min): its grid
took 19 minutes, each Fashion-MNIST search 15-18 minutes (0.50-0.56 CPU-hours), the finals
14 and the PTB task 31, 165.7 minutes in all (5.1 CPU-hours);
``benchmarks/reports/search_quality/invocations.jsonl`` has every invocation's wall time.
``--quick`` runs the whole pipeline at toy size in a few minutes: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from regime import load_runs, run_jobs, t_interval

from workers.final import summarize

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"
CONTROLLERS = ("rl", "random")
COLOURS = {"rl": "tab:red", "random": "tab:blue"}
FINAL_SEED0 = 100
LAST = 20
"""Trials at the end of each search whose mean reward compares the controllers."""


@dataclass(frozen=True)
class Task:
    """One experiment: a shipped space, budget changes for its trials, the grid, and sizes."""

    key: str
    title: str
    space: str
    budget: dict[str, Any]
    grid: tuple[str, ...]
    grid_seeds: int
    trials: int
    search_seeds: int
    asha: tuple[int, float]
    """ASHA's grace period (epochs) and reduction factor."""
    final_seeds: int
    finals: str = "all"
    """``all`` rows, or ``best``: the better searched row (by validation) and the tuned rows."""
    test_examples: int | None = None
    """None: the whole test split; ``--quick`` scores on a head of it."""

    @property
    def is_text(self) -> bool:
        return self.space == "transformer"

    @property
    def metric(self) -> str:
        return "perplexity" if self.is_text else "accuracy"

    def better(self, value: float, than: float) -> bool:
        return value < than if self.is_text else value > than

    def best_of(self, items: list, value):
        """The item whose ``value(item)`` scores best (first among ties)."""
        return (min if self.is_text else max)(items, key=value)

    def score(self, reward: float) -> float:
        """The validation metric behind a reward: accuracy, or perplexity ``80 / reward``."""
        from workers.training import ENAS_PERPLEXITY_SCALE

        if not self.is_text:
            return reward
        return ENAS_PERPLEXITY_SCALE / reward if reward > 0 else math.inf


IMAGE_GRID = ("none", "dropout:0.05", "dropout:0.1", "dropout:0.2", "spatial:0.02",
              "spatial:0.05", "spatial:0.1", "dropblock:0.02:3", "dropblock:0.05:3",
              "dropblock:0.1:3", "jumpout:0.1", "jumpout:0.3", "jumpout:0.6")
FULL = (
    Task("fashion-mnist", "Fashion-MNIST, WRN-10-1, 1,000 training images, 40 epochs",
         "convnet", {}, IMAGE_GRID, grid_seeds=2, trials=60, search_seeds=3, asha=(4, 3.0),
         final_seeds=5),
    Task("ptb", "PTB, GPT (2 layers, 128 wide), 50,000 training tokens, 10 epochs",
         "transformer", {}, ("none", "dropout:0.05", "dropout:0.1"), grid_seeds=1, trials=12,
         search_seeds=1, asha=(2, 3.0), final_seeds=3, finals="best"),
)
QUICK = (
    Task("fashion-mnist", "Fashion-MNIST, WRN-10-1, toy: 256 training images, 2 epochs",
         "convnet", {"train_examples": 256, "validation_examples": 256, "epochs": 2,
                     "eval_every": 2}, ("none", "dropout:0.1", "dropblock:0.1:3"), grid_seeds=1,
         trials=4, search_seeds=2, asha=(1, 2.0), final_seeds=2, test_examples=512),
    Task("ptb", "PTB, GPT, toy: 8,192 training tokens, 2 epochs", "transformer",
         {"train_examples": 8192, "validation_examples": 4096, "epochs": 2, "eval_every": 2},
         ("none", "dropout:0.1"), grid_seeds=1, trials=2, search_seeds=1, asha=(1, 2.0),
         final_seeds=2, finals="best", test_examples=8192),
)


@dataclass(frozen=True)
class Job:
    """One grid or final training run, done in a one-thread worker process."""

    stage: str
    """``grid`` (validation hold-out) or ``final`` (test split)."""
    task: str
    space_path: str
    ref: str
    """A baseline reference, or ``pattern:<hash>`` with the pattern in ``pattern``."""
    seed: int
    data_dir: str | None
    test_examples: int | None = None
    pattern: str | None = None
    """The pattern's JSON, for a pattern row."""

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.task}/{self.ref}/{self.seed}"


@dataclass
class Search:
    """One search's trials as the store has them, in the order they were proposed."""

    controller: str
    seed: int
    name: str
    trials: list[dict[str, Any]]
    """Per trial: ``status``, ``reward``, ``score`` (validation metric), ``cpu_hours``
    (its duration times one CPU) and ``ended`` (its rank in the order trials ended)."""
    wall_seconds: float
    best_hash: str | None
    best_score: float | None
    status: str = "completed"

    @property
    def cpu_hours(self) -> float:
        return sum(t["cpu_hours"] for t in self.trials)


@dataclass
class Row:
    method: str
    ref: str
    validation: float
    choosing_hours: float
    pattern: str | None = None
    test: dict[int, float] = field(default_factory=dict)
    final_hours: float = 0.0


# -- driver --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, for smoke testing")
    parser.add_argument("--out", help="results folder (default: benchmarks/reports/"
                        "search_quality; with --quick: benchmarks/results/search_quality-quick)")
    parser.add_argument("--data-dir", default=os.environ.get("AUTODROPOUT_DATA_DIR")
                        or (str(SHARED_DATA) if SHARED_DATA.is_dir() else None),
                        help="dataset folder (default: $AUTODROPOUT_DATA_DIR or ../shared/data)")
    parser.add_argument("--tasks", nargs="+", choices=[t.key for t in FULL],
                        default=[t.key for t in FULL], help="the tasks to train (the report "
                        "has every task run so far)")
    parser.add_argument("--workers", type=int, default=2, help="grid/final processes")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report "
                        "from the runs and searches in --out so far, train nothing")
    parser.add_argument("--ship", action="store_true", help="write each task's searched "
                        "winner from the finished run in --out as a built-in pattern")
    args = parser.parse_args(argv)
    default = "results/search_quality-quick" if args.quick else "reports/search_quality"
    out = Path(args.out or REPO / "benchmarks" / default)
    out.mkdir(parents=True, exist_ok=True)
    tasks = QUICK if args.quick else FULL
    recorded = load_recorded(out)
    if args.ship:
        for task in tasks:
            if task.key in args.tasks and task.key in recorded:
                ship(task, recorded[task.key], out, args.data_dir)
        return 0
    started = time.perf_counter()
    print(f"search quality{' (quick)' if args.quick else ''}: {', '.join(args.tasks)}; "
          f"results in {out}", flush=True)
    ray = None if args.report_only else start_ray(2)
    sections, raw = [], dict(recorded)  # a task not reached yet keeps its record
    try:
        for task in tasks:
            train = task.key in args.tasks and not args.report_only
            done = run_task(task, train, out, args, recorded.get(task.key, {}))
            if done is not None:
                sections.append(done[0])
                raw[task.key] = done[1]
                write_report(out, sections, raw, args.quick)
    finally:
        if ray is not None:
            ray.shutdown()
            log_invocation(out, time.perf_counter() - started, args)
    print("\n" + write_report(out, sections, raw, args.quick), end="", flush=True)
    return 0


def load_recorded(out: Path) -> dict[str, dict[str, Any]]:
    """Each task as the last report recorded it in ``results.json`` (``{}`` if none): a run
    whose ``store.db`` is gone reuses its completed searches and winners from here."""
    path = out / "results.json"
    return json.loads(path.read_text())["tasks"] if path.is_file() else {}


def log_invocation(out: Path, seconds: float, args: argparse.Namespace) -> None:
    """Append this invocation's wall time to ``invocations.jsonl`` (a resumed run's total is
    the sum over its invocations)."""
    with (out / "invocations.jsonl").open("a", encoding="utf-8") as log:
        log.write(json.dumps({"ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "seconds": seconds, "tasks": args.tasks}) + "\n")


def start_ray(cpus: int):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return ray


def write_report(out: Path, sections: list[str], raw: dict[str, Any], quick: bool) -> str:
    """Write ``results.md`` and ``results.json`` from the tasks done so far; returns the
    Markdown."""
    invocations = load_runs(out / "invocations.jsonl")
    elapsed = sum(i["seconds"] for i in invocations)
    footer = (f"Wall-clock time: {elapsed / 60:.1f} min on 2 cores over {len(invocations)} "
              f"invocation(s), each ending at {', '.join(i['ended'] for i in invocations)} "
              f"({'quick, toy sizes' if quick else 'full run'}); every run's CPU time is in "
              "the tables.")
    report = "# Search quality\n\n" + "\n\n".join([*sections, footer]) + "\n"
    (out / "results.md").write_text(report, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(
        {"elapsed_seconds": elapsed, "invocations": invocations, "quick": quick,
         "tasks": raw}, indent=2), encoding="utf-8")
    return report


def run_task(task: Task, train: bool, out: Path, args: argparse.Namespace,
             recorded: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Run the task's missing grid runs, searches and finals (``train``), or only read them;
    its report section and raw results, ``None`` if nothing of it has run."""
    space_path = derived_space(task, out) if train else space_file(task, out)
    if train:
        print(f"\n== {task.title}", flush=True)
    runs_path = out / "runs.jsonl"
    stage = time.perf_counter()
    grid_jobs = [Job("grid", task.key, str(space_path), ref, seed, args.data_dir)
                 for seed in range(task.grid_seeds) for ref in task.grid]
    if train:
        run_jobs(grid_jobs, runs_path, args.workers, run_job, describe)
        print(f"grid: {(time.perf_counter() - stage) / 60:.1f} min wall", flush=True)
    grid = [r for r in load_runs(runs_path)
            if r["stage"] == "grid" and r["task"] == task.key and r["ref"] in task.grid]
    kept = {s["name"]: Search(**s) for s in recorded.get("searches", [])}
    searches = [(run_one_search if train else read_stored_search)(
                    task, controller, seed, space_path, args.data_dir, out, kept)
                for seed in range(task.search_seeds) for controller in CONTROLLERS]
    searches = [search for search in searches if search is not None]
    if not grid and not searches:
        return None
    patterns = {r["ref"]: r["pattern"] for r in recorded.get("rows", []) if r["pattern"]}
    rows = choose_rows(task, grid, searches, out, patterns)
    stage = time.perf_counter()
    final_jobs = [Job("final", task.key, str(space_path), row.ref, FINAL_SEED0 + seed,
                      args.data_dir, task.test_examples, row.pattern)
                  for seed in range(task.final_seeds) for row in rows]  # seed-major: pairs first
    if train:
        run_jobs(final_jobs, runs_path, args.workers, run_job, describe)
        print(f"finals: {(time.perf_counter() - stage) / 60:.1f} min wall", flush=True)
    for run in load_runs(runs_path):
        for row in rows:
            if run["stage"] == "final" and run["task"] == task.key and run["ref"] == row.ref:
                row.test[run["seed"]] = run["value"]
                row.final_hours += run["cpu_seconds"] / 3600
    plot_search(task, searches, out / f"{task.key}-search.png")
    section = markdown(task, grid, searches, rows, f"{task.key}-search.png")
    raw = {"space": space_path.name, "grid": grid,
           "searches": [asdict(s) for s in searches],
           "rows": [asdict(r) for r in rows]}
    return section, raw


def space_file(task: Task, out: Path) -> Path:
    """Where the task's space, with its budget changes, is written in ``--out``."""
    return out / f"{task.key}-space.yaml"


def derived_space(task: Task, out: Path) -> Path:
    """The shipped space with the task's budget changes (none in the full run)."""
    import search_spaces

    data = yaml.safe_load(search_spaces.loader.resolve(task.space).read_text())
    data["budget"] = {**data["budget"], **task.budget}
    path = space_file(task, out)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# -- grid and final runs (worker processes) --------------------------------------------------
def run_job(job: Job) -> dict[str, Any]:
    """Train one grid or final run and score it; runs in a one-thread worker process."""
    import dataclasses

    import search_spaces
    from autodropout.patterns import Pattern
    from workers.baselines import parse_regularizer
    from workers.datasets import load_dataset, validation_split
    from workers.final import train_final, training_subset
    from workers.regularizers import apply_baseline
    from workers.training import Budget, build_child, train_child

    cpu = time.process_time()
    space = search_spaces.load(job.space_path)
    budget = Budget.from_mapping(space.budget)
    bundle = load_dataset(budget.dataset, job.data_dir, download=False)
    holdout = validation_split(bundle.train, budget.validation_examples, budget.train_examples)
    regularizer = (Pattern.from_dict(json.loads(job.pattern)) if job.pattern
                   else parse_regularizer(job.ref))
    metric = "val_perplexity" if bundle.kind == "text" else "val_accuracy"
    if job.stage == "grid":
        model = build_child(budget, bundle, job.seed, {})
        apply_baseline(model, regularizer)
        value = train_child(model, None, None, holdout, budget, "cpu", job.seed)[metric]
    else:
        if job.test_examples is not None:
            bundle = dataclasses.replace(bundle, test=training_subset(bundle.test,
                                                                      job.test_examples))
        value = train_final(bundle, budget, regularizer, job.seed, train=holdout.train,
                            site_modules=space.site_modules).value
    return {"key": job.key, "stage": job.stage, "task": job.task, "ref": job.ref,
            "seed": job.seed, "value": value, "cpu_seconds": time.process_time() - cpu}


def describe(run: dict[str, Any]) -> str:
    split = "validation" if run["stage"] == "grid" else "test"
    return f"{split} {run['value']:.4f}, {run['cpu_seconds'] / 60:.2f} CPU-min"


# -- searches --------------------------------------------------------------------------------
def store_url(out: Path) -> str:
    """The run's own pattern store, ``store.db`` in ``--out``."""
    return f"sqlite:///{out / 'store.db'}"


def search_name(task: Task, controller: str, seed: int) -> str:
    return f"{task.key}-{controller}-seed{seed}"


def stored_state(db: str, name: str):
    """The stored :class:`~patterns_db.states.SearchState` of ``name``, ``None`` if absent."""
    from autodropout.errors import NotFound
    from patterns_db import PatternStore

    with PatternStore(db) as store:
        try:
            return store.get_search(name).status
        except NotFound:
            return None


def run_one_search(task: Task, controller: str, seed: int, space_path: Path,
                   data_dir: str | None, out: Path, kept: dict[str, Search]) -> Search:
    """Run (or resume, or reuse) one ASHA search in the run's store and read its trials;
    a completed search that ``results.json`` kept but the store lacks is reused from there."""
    from controller.service import SearchOptions, run_search
    from patterns_db.states import SearchState

    db, name = store_url(out), search_name(task, controller, seed)
    state = stored_state(db, name)
    if state is None and name in kept and kept[name].status == "completed":
        print(f"search {name}: reused from results.json (not in {db})", flush=True)
        return kept[name]
    started = time.perf_counter()
    wall = earlier_wall(kept, name) if state is not None else 0.0
    if state != SearchState.COMPLETED:
        grace, reduction = task.asha
        fresh = dict(space=str(space_path), controller=controller, name=name, seed=seed,
                     scheduler="asha", asha_grace=grace, asha_reduction=reduction)
        result = run_search(SearchOptions(
            trials=task.trials, concurrent=2, db=db, data_dir=data_dir, cpus_per_trial=1,
            experiments_dir=str(out / "experiments"), progress=False,
            **({"resume": name} if state is not None else fresh)))
        if result.status != SearchState.COMPLETED:  # interrupted or failed: no row from it
            why = result.error or "no trial error"
            raise SystemExit(f"search {name} ended {result.status} ({why}); rerun this "
                             "command to resume it")
        wall += time.perf_counter() - started
    search = read_search(task, controller, seed, name, db, wall)
    counts = {s: sum(t["status"] == s for t in search.trials)
              for s in sorted({t["status"] for t in search.trials})}
    shown = "-" if search.best_score is None else f"{search.best_score:.4f}"
    print(f"search {name}: {counts}, best validation {task.metric} {shown}, "
          f"{search.cpu_hours:.3f} CPU-h, {search.wall_seconds / 60:.1f} min wall", flush=True)
    return search


def read_stored_search(task: Task, controller: str, seed: int, space_path: Path,
                       data_dir: str | None, out: Path,
                       kept: dict[str, Search]) -> Search | None:
    """The search as the store has it now (any state), else as ``results.json`` kept it,
    or ``None`` if it never started."""
    db, name = store_url(out), search_name(task, controller, seed)
    if stored_state(db, name) is None:
        return kept.get(name)
    return read_search(task, controller, seed, name, db, earlier_wall(kept, name))


def earlier_wall(kept: dict[str, Search], name: str) -> float:
    """The wall seconds ``results.json`` recorded for a search that had run before (NaN if
    it recorded none), so that reading or resuming a search keeps its earlier time."""
    return kept[name].wall_seconds if name in kept else math.nan


def read_search(task: Task, controller: str, seed: int, name: str, db: str,
                wall: float) -> Search:
    from patterns_db import PatternStore

    with PatternStore(db) as store:
        trials = store.trials(name, with_metrics=False)
        status = str(store.get_search(name).status)
    trials = sorted(trials, key=lambda t: (t.created_at, t.trial_id))
    ended = {t.trial_id: rank for rank, t in enumerate(sorted(trials, key=lambda t: t.updated_at))}
    rows = [{"trial": t.trial_id, "status": str(t.status), "reward": t.reward,
             "hash": t.pattern_hash, "ended": ended[t.trial_id],
             "score": None if t.reward is None else task.score(t.reward),
             "cpu_hours": (t.duration or 0.0) / 3600} for t in trials]
    done = [r for r in rows if r["status"] == "completed" and r["score"] is not None]
    best = task.best_of(done, lambda r: r["score"]) if done else None
    return Search(controller, seed, name, rows, wall, best and best["hash"],
                  best and best["score"], status)


def best_so_far(task: Task, search: Search, order: str = "trial") -> list[tuple[float, float]]:
    """(x, best completed score so far) after each trial: x is the trial number in proposal
    order, or (``order="cpu"``) the CPU-hours spent by then in the order trials ended."""
    trials = search.trials if order == "trial" else sorted(search.trials, key=lambda t: t["ended"])
    best, spent, curve = math.nan, 0.0, []
    for number, trial in enumerate(trials, 1):
        spent += trial["cpu_hours"]
        score = trial["score"] if trial["status"] == "completed" else None
        if score is not None and (math.isnan(best) or task.better(score, best)):
            best = score
        curve.append((number if order == "trial" else spent, best))
    return curve


def value_at(curve: list[tuple[float, float]], x: float) -> float:
    """The step function ``curve`` at ``x`` (NaN before its first point and after its last:
    a search that has not got that far has no value there)."""
    if not curve or x > curve[-1][0] + 1e-12:
        return math.nan
    value = math.nan
    for point, best in curve:
        if point > x + 1e-12:
            break
        value = best
    return value


# -- rows ------------------------------------------------------------------------------------
def choose_rows(task: Task, grid: list[dict[str, Any]], searches: list[Search], out: Path,
                patterns: dict[str, str]) -> list[Row]:
    """Each controller's best winner, "none", and each family's best rate by validation
    (a winner's pattern JSON from ``patterns``, by ``pattern:<hash>``, else from the store)."""
    from patterns_db import PatternStore
    from workers.baselines import parse_regularizer

    rows = []
    for controller in CONTROLLERS:
        runs = [s for s in searches
                if s.controller == controller and s.best_hash and s.status == "completed"]
        if not runs:
            print(f"{controller}: no completed trial, no row", flush=True)
            continue
        best = task.best_of(runs, lambda s: s.best_score)
        cost = sum(s.cpu_hours for s in searches if s.controller == controller)
        rows.append(Row(f"{controller} search", f"pattern:{best.best_hash}", best.best_score,
                        cost))
    if task.finals == "best" and rows:
        rows = [task.best_of(rows, lambda r: r.validation)]
    for row in rows:  # only the winners that go to the finals need their pattern
        row.pattern = patterns.get(row.ref)
        if row.pattern is None:
            with PatternStore(store_url(out)) as store:
                pattern = store.resolve(row.ref.removeprefix("pattern:")).pattern
            row.pattern = json.dumps(pattern.to_dict())
    families: dict[str, dict[str, list[dict]]] = {}
    for run in grid:
        family = parse_regularizer(run["ref"]).family
        families.setdefault(family, {}).setdefault(run["ref"], []).append(run)
    for family, refs in families.items():
        means = {ref: statistics.fmean(x["value"] for x in runs) for ref, runs in refs.items()}
        ref = task.best_of(list(means), means.get)
        cost = sum(x["cpu_seconds"] for runs in refs.values() for x in runs) / 3600
        rows.append(Row(family if family == "none" else f"{family} (tuned)", ref, means[ref],
                        cost))
    return rows


# -- report ----------------------------------------------------------------------------------
def markdown(task: Task, grid: list[dict[str, Any]], searches: list[Search], rows: list[Row],
             png: str) -> str:
    grace, reduction = task.asha
    lines = [f"## {task.title}", "",
             f"Grid: {len(task.grid)} settings x {task.grid_seeds} seed(s) on the validation "
             f"hold-out; searches: {task.trials} trials each, {task.search_seeds} seed(s) per "
             f"controller, ASHA grace {grace} epochs, reduction {reduction:g}; finals: "
             f"{task.final_seeds} seeds ({FINAL_SEED0}-{FINAL_SEED0 + task.final_seeds - 1}) per "
             "row, scored on the test split.", "",
             grid_table(task, grid), "", search_table(task, searches), "",
             f"| method | chosen | validation {task.metric} | test {task.metric} mean ± std "
             "(n) | choosing CPU-h | final CPU-h |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        mean, std = summarize(list(row.test.values()))
        test = "-" if not row.test else f"{mean:.4f} ± {std:.4f} ({len(row.test)})"
        lines.append(f"| {row.method} | `{row.ref[:20]}` | {row.validation:.4f} | {test} | "
                     f"{row.choosing_hours:.3f} | {row.final_hours:.3f} |")
    lines += ["", paired_table(task, rows), "", rl_against_random(task, searches), "",
              f"![best-so-far validation {task.metric}, RL against random]({png})"]
    return "\n".join(lines)


def grid_table(task: Task, grid: list[dict[str, Any]]) -> str:
    lines = [f"| grid setting | validation {task.metric} (mean over seeds) | CPU-min |",
             "|---|---:|---:|"]
    for ref in task.grid:
        runs = [r for r in grid if r["ref"] == ref]
        if runs:
            lines.append(f"| {ref} | {statistics.fmean(r['value'] for r in runs):.4f} | "
                         f"{sum(r['cpu_seconds'] for r in runs) / 60:.1f} |")
    return "\n".join(lines) + seed_noise(task, grid)


def seed_noise(task: Task, grid: list[dict[str, Any]]) -> str:
    """The grid's seed-to-seed noise: the standard deviation of the difference between seeds
    0 and 1 of each setting, and one run's (that over the square root of 2)."""
    values = {(r["ref"], r["seed"]): r["value"] for r in grid}
    gaps = [values[ref, 0] - values[ref, 1] for ref in task.grid
            if (ref, 0) in values and (ref, 1) in values]
    if len(gaps) < 2:
        return ""
    spread = statistics.stdev(gaps)
    return (f"\n\nSeed-to-seed noise: the difference between a setting's seeds 0 and 1 has "
            f"standard deviation {spread:.4f} over {len(gaps)} settings, so one run's "
            f"validation {task.metric} varies by about {spread / math.sqrt(2):.4f}.")


def search_table(task: Task, searches: list[Search]) -> str:
    lines = [f"| search | state | trials (completed / early-stopped / failed) | best completed "
             f"validation {task.metric} | CPU-h |", "|---|---|---|---:|---:|"]
    for search in searches:
        counts = [sum(t["status"] == state for t in search.trials)
                  for state in ("completed", "early-stopped", "failed")]
        best = "-" if search.best_score is None else f"{search.best_score:.4f}"
        lines.append(f"| {search.name} | {search.status} | {len(search.trials)} "
                     f"({' / '.join(map(str, counts))}) | {best} | {search.cpu_hours:.3f} |")
    return "\n".join(lines)


def paired_table(task: Task, rows: list[Row]) -> str:
    """Each searched row minus the best tuned baseline (by validation) and minus none."""
    baselines = [r for r in rows if r.pattern is None and r.ref != "none"]
    none = next((r for r in rows if r.ref == "none"), None)
    best = task.best_of(baselines, lambda r: r.validation) if baselines else None
    unit = "perplexity" if task.is_text else "points"
    lines = [f"Paired test differences (same final seeds), searched row minus baseline, in "
             f"{unit}, 95 % t-interval; the best tuned baseline by validation is "
             f"{best.ref if best else '-'}:", "",
             "| searched row | against | difference [95 % t] |", "|---|---|---|"]
    scale = 1.0 if task.is_text else 100.0
    for row in (r for r in rows if r.pattern is not None):
        for other in (b for b in (best, none) if b is not None):
            seeds = sorted(row.test.keys() & other.test.keys())
            gaps = [scale * (row.test[s] - other.test[s]) for s in seeds]
            lines.append(f"| {row.method} | {other.ref} | {_interval(gaps)} |")
    return "\n".join(lines)


def rl_against_random(task: Task, searches: list[Search]) -> str:
    seeds = sorted({s.seed for s in searches})
    by = {(s.controller, s.seed): s for s in searches}
    marks = sorted({n for n in (10, 20, 30, 40, 50, 60) if n <= task.trials} | {task.trials})
    lines = [f"RL against random: best completed validation {task.metric} after N trials, mean "
             f"over {len(seeds)} seed(s); difference paired by seed with a 95 % t-interval:", "",
             "| N | RL | random | RL - random |", "|---:|---:|---:|---|"]
    for n in marks:
        values = {c: {seed: value_at(best_so_far(task, by[c, seed]), n)
                      for seed in seeds if (c, seed) in by} for c in CONTROLLERS}
        gaps = [values["rl"][s] - values["random"][s] for s in seeds
                if s in values["rl"] and s in values["random"]]
        lines.append(f"| {n} | {_mean(values['rl'].values())} | "
                     f"{_mean(values['random'].values())} | {_interval(gaps, 4)} |")
    lines += ["", f"Mean reward of the last {LAST} trials of each search (the reward each trial "
              "reported last: an early-stopped trial's is its last rung's), pooled over seeds, "
              "with a 95 % t-interval, and RL minus random (Welch):", "",
              "| controller | trials | mean reward [95 % t] | CPU-h (all seeds) |",
              "|---|---:|---|---:|"]
    pooled = {}
    for controller in CONTROLLERS:
        mine = [s for s in searches if s.controller == controller]
        pooled[controller] = [t["reward"] for s in mine for t in s.trials[-LAST:]
                              if t["reward"] is not None]
        lines.append(f"| {controller} | {len(pooled[controller])} | "
                     f"{_interval(pooled[controller], 4, sign='')} | "
                     f"{sum(s.cpu_hours for s in mine):.3f} |")
    lines += ["", f"RL - random, last {LAST} trials: {_welch(pooled['rl'], pooled['random'])}"]
    return "\n".join(lines)


def plot_search(task: Task, searches: list[Search], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, order, label in ((axes[0], "trial", "trials"), (axes[1], "cpu", "CPU-hours")):
        for controller in CONTROLLERS:
            curves = [best_so_far(task, s, order) for s in searches if s.controller == controller]
            if not curves:
                continue
            end = min(c[-1][0] for c in curves)  # where every seed still has a value
            xs = np.arange(1, end + 1) if order == "trial" else np.linspace(0, end, 200)
            ys = np.array([[value_at(c, x) for x in xs] for c in curves])  # (seeds, points)
            with warnings.catch_warnings():  # all-NaN columns: before any trial completed
                warnings.simplefilter("ignore", RuntimeWarning)
                axis.plot(xs, np.nanmean(ys, axis=0), color=COLOURS[controller],
                          label=f"{controller} (mean of {len(curves)})")
                axis.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0),
                                  color=COLOURS[controller], alpha=0.2)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"best completed validation {task.metric}")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{task.title}: best so far, band = min-max over seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _mean(values) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{statistics.fmean(finite):.4f}" if finite else "-"


def _interval(values: list[float], digits: int = 2, sign: str = "+") -> str:
    """Mean and 95 % t-interval; ``sign=""`` for a level rather than a difference."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    mean, low, high = t_interval(values)
    number = f"{{:{sign}.{digits}f}}".format
    if math.isnan(low):
        return f"{number(mean)} (n=1)"
    return f"{number(mean)} [{number(low)}, {number(high)}] (n={len(values)})"


def _welch(a: list[float], b: list[float]) -> str:
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return "-"
    test = stats.ttest_ind(a, b, equal_var=False)
    low, high = test.confidence_interval(0.95)
    return (f"{statistics.fmean(a) - statistics.fmean(b):+.4f} [{low:+.4f}, {high:+.4f}], "
            f"p = {test.pvalue:.2g}")


# -- built-in patterns -----------------------------------------------------------------------
def ship(task: Task, raw: dict[str, Any], out: Path, data_dir: str | None) -> None:
    """Write the task's best searched row (by validation) as a built-in pattern, with its
    provenance and measured test gains, into ``autodropout/builtin``."""
    import search_spaces
    from autodropout.builtin import write_builtin
    from autodropout.patterns import Pattern

    rows = [Row(**r) for r in raw["rows"]]
    searched = [r for r in rows if r.pattern is not None]
    if not searched:
        print(f"{task.key}: no searched row to ship", flush=True)
        return
    row = task.best_of(searched, lambda r: r.validation)
    baselines = [r for r in rows if r.pattern is None and r.ref != "none"]
    best = task.best_of(baselines, lambda r: r.validation) if baselines else None
    none = next((r for r in rows if r.ref == "none"), None)
    search = next(s for s in raw["searches"] if s["best_hash"] == row.ref.split(":", 1)[1])
    pattern = Pattern.from_dict(json.loads(row.pattern))
    space = search_spaces.load(space_file(task, out))
    entry = builtin_entry(task, row, best, none, search, space.budget)
    entry["version"] = next_version(entry["name"], pattern)
    entry["map_shape"] = first_site_shape(space, pattern, data_dir)
    write_builtin(pattern, entry)
    print(f"shipped builtin:{entry['name']} ({row.ref[:20]})", flush=True)


def next_version(name: str, pattern) -> int:
    """The shipped version of ``name`` if it holds ``pattern``, one more if it holds another
    pattern, 1 if nothing is shipped under the name."""
    from autodropout.builtin import builtin_pattern
    from autodropout.errors import NotFound

    try:
        shipped = builtin_pattern(name)
    except NotFound:
        return 1
    return shipped.version + (shipped.hash != pattern.hash)


def first_site_shape(space, pattern, data_dir: str | None) -> list[int]:
    """The map the pattern's first site sees on the model it was found on, (C, H, W) or
    (T, C), from one eval forward pass on a test example."""
    import torch

    import autodropout as ad
    from workers.datasets import load_dataset
    from workers.training import Budget, build_child, site_selectors

    budget = Budget.from_mapping(space.budget)
    bundle = load_dataset(budget.dataset, data_dir, download=False)
    model = build_child(budget, bundle, 0, {}).eval()
    handle = ad.apply_pattern(model, pattern, site_selectors(pattern, space.site_modules))
    first = next(module for name, module in model.named_modules()
                 if handle.assignment.get(name) == 0)
    seen = []
    first.register_forward_hook(lambda module, args, out: seen.append(list(out.shape[1:])))
    example = (bundle.test.images[:1].float() / 255 if bundle.kind == "image"
               else bundle.test[:budget.context].view(1, budget.context))  # (1, ...) one input
    with torch.no_grad():
        model(example)
    return seen[0]


def builtin_entry(task: Task, row: Row, best: Row | None, none: Row | None,
                  search: dict[str, Any], budget: dict[str, Any]) -> dict[str, Any]:
    """The catalog entry (:mod:`autodropout.builtin.catalog`) of a shipped row but its
    ``version`` and ``map_shape``: where it was found, and its paired test differences in the
    metric's units (pattern minus baseline)."""
    def gap(other: Row | None) -> dict[str, float] | None:
        if other is None:
            return None
        seeds = sorted(row.test.keys() & other.test.keys(), key=int)
        mean, low, high = t_interval([row.test[s] - other.test[s] for s in seeds])
        return {"mean": mean, "low": low, "high": high}

    mean, std = summarize(list(row.test.values()))
    return {
        "name": f"{budget['model']}-{budget['dataset']}", "version": None,
        "summary": f"{row.method} winner, {task.title}",
        "space": task.space, "dataset": budget["dataset"], "model": budget["model"],
        "model_args": {"width": budget["width"]} if "width" in budget else {},
        "map_shape": None,
        "search": {"name": search["name"], "controller": search["controller"],
                   "seed": search["seed"], "trials": len(search["trials"])},
        "validation": {"metric": f"val_{task.metric}", "value": row.validation},
        "test": {"metric": f"test_{task.metric}", "seeds": sorted(int(s) for s in row.test),
                 "mean": mean, "std": std, "best_fixed": best and best.ref,
                 "vs_none": gap(none), "vs_best_fixed": gap(best) if best else None},
        "report": "benchmarks/reports/search_quality/results.md",
    }


if __name__ == "__main__":
    sys.exit(main())
