"""Search service benchmark: per-trial overhead, controller latency, concurrent speed-up.

* per-trial overhead: how long the driver sees a trial (Tune's trial start to its end) minus
  the training it reports (the sum of its ``epoch_seconds``), median over the trials of a
  one-at-a-time search; target under 5% of a 30 s trial;
* controller latency: ``PatternSearcher.suggest`` and the policy update of
  ``PatternSearcher.on_trial_complete`` (``update_every=1``), median over ``--calls`` calls on
  the convnet space, transformer and LSTM policies, on 1 torch thread and on the driver's
  default; target suggest under 10 ms;
* speed-up: the same ``--trials`` trials of a fixed budget (WRN on synthetic images, about
  ``--epochs`` x 3 s each on one core) run 1 at a time on 1 CPU, 2 at a time on 1 CPU each,
  and 1 at a time on 2 CPUs; target 2 concurrent trials at least 1.8x faster than 1.

    python benchmarks/search_overhead.py             # about 3 minutes on 2 idle cores
    python benchmarks/search_overhead.py --trials 6 --epochs 4

Prints a Markdown table and the load average (other work on the machine skews the timings).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

OVERHEAD_TARGET = 0.05
REFERENCE_TRIAL_S = 30.0
SUGGEST_TARGET_MS = 10.0
SPEEDUP_TARGET = 1.8
BUDGET = {"train_examples": 1024, "validation_examples": 256, "batch_size": 64}


def benchmark_space(folder: Path) -> str:
    """The tiny space with a budget large enough that a trial's epoch takes seconds."""
    import search_spaces

    spec = yaml.safe_load(search_spaces.load("tiny").yaml_text)
    spec["name"] = "overhead-bench"
    spec["budget"].update(BUDGET)
    path = folder / "overhead-bench.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


class TrialClock:
    """Wraps StoreCallback to time each trial as the driver sees it, from Tune's trial start
    (its actor ready) to its end, next to the training the trial reports."""

    def __init__(self) -> None:
        from controller.callbacks import StoreCallback

        self.started: dict[str, float] = {}
        self.training: dict[str, float] = {}
        self.spans: list[tuple[float, float]] = []  # (driver wall, reported training) seconds
        start, record = StoreCallback.on_trial_start, StoreCallback.on_trial_result
        complete = StoreCallback.on_trial_complete

        def on_trial_start(callback, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.perf_counter()
            self.training[trial.trial_id] = 0.0
            start(callback, iteration, trials, trial, **info)

        def on_trial_result(callback, iteration, trials, trial, result, **info):
            self.training[trial.trial_id] += result["epoch_seconds"]
            record(callback, iteration, trials, trial, result, **info)

        def on_trial_complete(callback, iteration, trials, trial, **info):
            wall = time.perf_counter() - self.started[trial.trial_id]
            self.spans.append((wall, self.training[trial.trial_id]))
            complete(callback, iteration, trials, trial, **info)

        StoreCallback.on_trial_start = on_trial_start
        StoreCallback.on_trial_result = on_trial_result
        StoreCallback.on_trial_complete = on_trial_complete


def run(folder: Path, space: str, name: str, trials: int, epochs: int, concurrent: int,
        cpus: float) -> float:
    from controller.service import SearchOptions, run_search

    options = SearchOptions(space=space, dataset="synthetic", trials=trials, epochs=epochs,
                            concurrent=concurrent, cpus_per_trial=cpus, controller="random",
                            db=f"sqlite:///{folder / 'patterns.db'}", name=name,
                            experiments_dir=str(folder / "experiments"), progress=False)
    started = time.perf_counter()
    result = run_search(options)
    wall = time.perf_counter() - started
    if result.status != "completed":
        raise SystemExit(f"search {name} ended {result.status}")
    return wall


def controller_latency(calls: int, threads: int) -> dict[str, tuple[float, float]]:
    """Median suggest and update milliseconds of PatternSearcher per policy architecture, with
    ``threads`` torch threads (tiny ops on many threads stall when trials busy every core)."""
    import torch

    import search_spaces
    from controller.controllers import RLController
    from controller.searcher import PatternSearcher

    space = search_spaces.load("convnet")
    latencies = {}
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    for architecture in ("transformer", "lstm"):
        settings = {**space.controller, "architecture": architecture}
        settings.pop("reward", None)
        searcher = PatternSearcher(RLController(space, seed=0, **settings), metric="reward",
                                   mode="max")
        suggest, update = [], []
        for call in range(calls):
            trial_id = f"t{call}"
            started = time.perf_counter()
            searcher.suggest(trial_id)
            suggest.append(time.perf_counter() - started)
            result = {"reward": 0.5 + 0.001 * call, "final": True}
            started = time.perf_counter()
            searcher.on_trial_complete(trial_id, result)
            update.append(time.perf_counter() - started)
        latencies[architecture] = (1000 * statistics.median(suggest),
                                   1000 * statistics.median(update))
    torch.set_num_threads(default_threads)
    return latencies


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per speed-up run")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--calls", type=int, default=200, help="controller calls per policy")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    import torch

    latency_rows = []
    for threads in sorted({1, torch.get_num_threads()}):
        for architecture, (suggest_ms, update_ms) in controller_latency(args.calls,
                                                                         threads).items():
            where = f"{architecture} policy, {threads} thread(s), median of {args.calls}"
            latency_rows.append((f"suggest, {where}", f"{suggest_ms:.2f} ms",
                                 f"< {SUGGEST_TARGET_MS:g} ms",
                                 verdict(suggest_ms < SUGGEST_TARGET_MS)))
            latency_rows.append((f"update, {where}", f"{update_ms:.2f} ms", "-", "-"))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    clock = TrialClock()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        space = benchmark_space(folder)
        run(folder, space, "warm-up", 1, 1, 1, 1.0)  # worker processes, imports, dataset
        clock.spans.clear()
        one = run(folder, space, "1x1cpu", args.trials, args.epochs, 1, 1.0)
        spans = list(clock.spans)
        two = run(folder, space, "2x1cpu", args.trials, args.epochs, 2, 1.0)
        wide = run(folder, space, "1x2cpu", args.trials, args.epochs, 1, 2.0)
    ray.shutdown()

    rows = []
    overhead = statistics.median(wall - training for wall, training in spans)
    training = statistics.median(training for _, training in spans)
    # the whole search's wall time per trial beyond training: also scheduling between
    # trials, the driver's dataset load, Tune's setup and the final save
    amortized = (one - sum(training for _, training in spans)) / len(spans)
    for label, seconds in ((f"per-trial overhead, trial start to end (median of {len(spans)})",
                            overhead),
                           ("per-trial overhead, search wall / trials (1 at a time)", amortized)):
        share = seconds / REFERENCE_TRIAL_S
        rows.append((label, f"{seconds:.2f} s = {100 * share:.1f}% of a "
                     f"{REFERENCE_TRIAL_S:g} s trial", f"< {100 * OVERHEAD_TARGET:g}%",
                     verdict(share < OVERHEAD_TARGET)))
    rows.append(("median training per trial (sum of epoch_seconds)", f"{training:.1f} s", "-",
                 "-"))
    rows.extend(latency_rows)
    rows.append((f"{args.trials} trials, 1 at a time, 1 CPU each", f"{one:.1f} s", "-", "-"))
    rows.append((f"{args.trials} trials, 2 at a time, 1 CPU each", f"{two:.1f} s", "-", "-"))
    rows.append((f"{args.trials} trials, 1 at a time, 2 CPUs each", f"{wide:.1f} s", "-", "-"))
    rows.append(("speed-up 2x1 CPU over 1x1 CPU", f"{one / two:.2f}x",
                 f">= {SPEEDUP_TARGET:g}x", verdict(one / two >= SPEEDUP_TARGET)))
    rows.append(("speed-up 1x2 CPU over 1x1 CPU", f"{one / wide:.2f}x", "-", "-"))

    print("| measure | value | target | result |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\n{os.cpu_count()} cores, load average {load} (1, 5, 15 min); "
          f"driver torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
