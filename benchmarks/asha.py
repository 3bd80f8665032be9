"""ASHA against full-budget trials: trials per CPU-hour, and the best validation score
reached at equal CPU-hours.

One run, one local Ray: two searches on the same space, dataset subset, controller (``rl``)
and seed, through :func:`controller.service.run_search` as ``autodropout search`` runs
them: ``--scheduler none`` (every trial trains the whole budget) and ``--scheduler asha``
(most patterns stop at the first rung; the controller learns by the rung rule of
:mod:`controller.outcome`). ASHA gets more trials, so that both spend about the same CPU
time. A trial's CPU-seconds are its duration times its CPUs (one each); a search's curve
adds them up in the order the trials ended, and the best score at a mark is the best
*completed* (full-budget) trial's validation accuracy among the trials ended by then (an
early-stopped trial's score is for a shorter budget and is not a candidate).

Sizes (our choice, for this 2-core machine, two trials at a time with one CPU each):

* default: the ``convnet`` space's own budget on Fashion-MNIST from ``../shared/data``
  (``--data-dir``): the proxy the regime study chose (``benchmarks/reports/regime``: WRN-10-1,
  1,000 training and 5,000 validation images, 40 epochs, validation after the last epoch and
  at ASHA's rungs), ASHA grace 4 epochs and reduction 3 (rungs at epochs 4, 12 and 36,
  max_t 40); 16 full-budget trials against 60 ASHA trials, seed 0. In the committed run
  (``benchmarks/reports/asha``) a full trial took about 0.55 CPU-minutes and an ASHA trial
  (about 12 epochs) about a third of that, each search 0.15-0.19 CPU-hours: some 11 minutes
  of wall time in all;
* ``--quick``: the ``tiny`` space on the synthetic dataset, 128 training images, 3 epochs,
  grace 1 and reduction 2 (rungs 1 and 2), 4 against 6 trials: under a minute after Ray
  starts. It checks the pipeline; its numbers mean nothing.

    python benchmarks/asha.py [--quick] [--out FILE.json] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Sizes:
    space: str
    dataset: str
    epochs: int
    train_examples: int
    full_trials: int
    asha_trials: int
    grace: int
    reduction: float
    concurrent: int = 2
    seed: int = 0


DEFAULT = Sizes("convnet", "fashion-mnist", epochs=40, train_examples=1000, full_trials=16,
                asha_trials=60, grace=4, reduction=3.0)
QUICK = Sizes("tiny", "synthetic", epochs=3, train_examples=128, full_trials=4, asha_trials=6,
              grace=1, reduction=2.0)
MARKS = (0.25, 0.5, 0.75, 1.0)
"""The CPU-hour marks of the table, as fractions of the smaller search's CPU-hours."""


def run_one(sizes: Sizes, scheduler: str, workdir: Path, data_dir: str | None) -> dict[str, Any]:
    """Run one search and return its trials (end order) with CPU-hours and outcomes."""
    from controller.controllers import deserialize_state
    from controller.service import SearchOptions, run_search
    from patterns_db import PatternStore

    db = f"sqlite:///{workdir / 'patterns.db'}"
    name = f"asha-bench-{scheduler}"
    asha = scheduler == "asha"
    options = SearchOptions(
        space=sizes.space, dataset=sizes.dataset, trials=sizes.asha_trials if asha else sizes.full_trials,
        concurrent=sizes.concurrent, epochs=sizes.epochs, train_examples=sizes.train_examples,
        db=db, name=name, seed=sizes.seed, data_dir=data_dir, progress=False,
        experiments_dir=str(workdir / "experiments"), scheduler=scheduler,
        asha_grace=sizes.grace if asha else None, asha_reduction=sizes.reduction if asha else None)
    result = run_search(options)
    with PatternStore(db) as store:
        trials = sorted(store.trials(name), key=lambda trial: trial.updated_at)
        settings = store.get_search(name).controller_settings
        state = deserialize_state(store.load_controller_state(name))
    cpu_hours, best, curve = 0.0, None, []
    for trial in trials:
        cpu_hours += (trial.duration or 0.0) * options.cpus_per_trial / 3600
        if trial.status == "completed" and trial.reward is not None:
            best = trial.reward if best is None else max(best, trial.reward)
        epochs = max((step.get("epoch", 0) for step in trial.metrics), default=0)
        curve.append({"trial": trial.trial_id, "status": str(trial.status), "epochs": int(epochs),
                      "reward": trial.reward, "cpu_hours": cpu_hours, "best": best})
    return {"scheduler": scheduler, "status": str(result.status), "trials": len(trials),
            "counts": result.trial_counts, "cpu_hours": cpu_hours, "wall_s": result.elapsed,
            "epochs_trained": sum(point["epochs"] for point in curve),
            "controller_updates": state.get("updates"), "best": best, "curve": curve,
            "settings": {key: value for key, value in settings.items()
                         if key.startswith("asha") or key == "scheduler"}}


def best_at(run: dict[str, Any], cpu_hours: float) -> float | None:
    """The best completed trial's score among the trials ended within ``cpu_hours``."""
    best = None
    for point in run["curve"]:
        if point["cpu_hours"] > cpu_hours + 1e-12:
            break
        best = point["best"]
    return best


def report(sizes: Sizes, runs: list[dict[str, Any]]) -> str:
    def number(value, digits=4):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"ASHA vs full budget: space {sizes.space}, {sizes.dataset}, "
             f"{sizes.train_examples} training examples, {sizes.epochs} epochs, seed {sizes.seed}, "
             f"ASHA grace {sizes.grace} reduction {sizes.reduction:g}", "",
             "| scheduler | trials | completed | early-stopped | epochs trained | controller "
             "updates | CPU-hours | trials per CPU-hour | best score | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        per_hour = run["trials"] / run["cpu_hours"] if run["cpu_hours"] else float("nan")
        lines.append(
            f"| {run['scheduler']} | {run['trials']} | {run['counts'].get('completed', 0)} | "
            f"{run['counts'].get('early-stopped', 0)} | {run['epochs_trained']} | "
            f"{run['controller_updates']} | {run['cpu_hours']:.4f} | {per_hour:.0f} | "
            f"{number(run['best'])} | {run['wall_s']:.0f} |")
    common = min(run["cpu_hours"] for run in runs)
    lines += ["", "best completed-trial score reached by each CPU-hour mark:", "",
              "| CPU-hours | " + " | ".join(run["scheduler"] for run in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for fraction in MARKS:
        mark = fraction * common
        lines.append(f"| {mark:.4f} | " + " | ".join(number(best_at(run, mark)) for run in runs)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="synthetic data, a few trials")
    parser.add_argument("--data-dir", help=f"dataset folder (default: {SHARED_DATA})")
    parser.add_argument("--out", help="also write the runs as JSON to this file")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULT
    data_dir = None if args.quick else (args.data_dir or str(SHARED_DATA))

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=sizes.concurrent, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="asha-bench-") as folder:
            runs = [run_one(sizes, scheduler, Path(folder), data_dir)
                    for scheduler in ("none", "asha")]
    finally:
        ray.shutdown()
    print(report(sizes, runs))
    if args.out:
        Path(args.out).write_text(json.dumps({"sizes": sizes.__dict__, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
