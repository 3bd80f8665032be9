"""``autodropout searches list|show``: recorded searches and their progress from a shell.

Every command takes ``--db URL`` (as ``autodropout patterns``). Exit codes: 0 ok, 1 not
found, 2 bad input.

``--json`` output is a stable interface for scripts: keys are only ever added, never renamed
or removed. Times are ISO 8601 UTC strings, rewards and metric values numbers (``null``
when absent), hashes full 64-digit SHA-256 hex.

* ``searches list --json``: a list, oldest first, of ``{"name", "space", "dataset", "model",
  "status", "host", "started_at", "finished_at", "trials", "trials_by_status",
  "best_reward", "best_trial", "best_hash", "error"}`` (``error``: why a failed search
  failed, else null).
* ``searches show NAME --json``: the same object plus ``"controller_settings"``,
  ``"curve"``, a list of ``{"trial", "status", "reward", "best_so_far"}`` in trial order,
  and ``"trial_table"``, a list of ``{"trial", "status", "reward", "epochs", "pattern",
  "error"}`` in the same order (``pattern`` the full hash, ``epochs`` the last reported).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from autodropout.errors import BadInput
from patterns_db.states import TrialState

from .output import (
    db_option,
    number,
    open_store,
    print_fields,
    print_json,
    print_table,
    store_group,
)


def register(commands: argparse._SubParsersAction) -> None:
    common = db_option()
    sub = store_group(commands, "searches", __doc__, help="list and inspect pattern searches",
                      description="Pattern searches recorded in the store.")

    listing = sub.add_parser("list", parents=[common], help="every search and its progress")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_searches_list)

    show = sub.add_parser(
        "show", parents=[common], help="trials done, best so far, the reward-over-trials curve"
    )
    show.add_argument("name", metavar="NAME")
    show.add_argument("--png", metavar="FILE", help="also plot reward over trials to FILE")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=_searches_show)


def _search_json(summary: Any) -> dict[str, Any]:
    search = summary.search
    return {
        "name": search.name,
        "space": search.space_name,
        "dataset": search.dataset,
        "model": search.model,
        "status": search.status,
        "host": search.host,
        "started_at": search.started_at.isoformat(),
        "finished_at": search.finished_at.isoformat() if search.finished_at else None,
        "trials": summary.trials,
        "trials_by_status": dict(sorted(summary.trial_counts.items())),
        "best_reward": summary.best_reward,
        "best_trial": summary.best_trial_id,
        "best_hash": summary.best_pattern_hash,
        "error": search.error,
    }


def _searches_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        rows = [_search_json(summary) for summary in store.searches()]
    if args.json:
        return print_json(rows)
    if not rows:
        print("no searches")
        return 0
    print_table(
        ("NAME", "STATUS", "SPACE", "DATASET", "MODEL", "TRIALS", "BEST", "STARTED"),
        [
            (
                r["name"],
                r["status"],
                r["space"],
                r["dataset"],
                r["model"],
                str(r["trials"]),
                number(r["best_reward"]),
                r["started_at"][:19].replace("T", " "),
            )
            for r in rows
        ],
        right=("TRIALS", "BEST"),
    )
    return 0


def _searches_show(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        summary = store.search_summary(args.name)
        trials = store.trials(args.name)
    curve = _reward_curve(trials)
    if args.png:
        _plot_curve(args.name, curve, args.png)
    result = {
        **_search_json(summary),
        "controller_settings": summary.search.controller_settings,
        "curve": curve,
        "trial_table": [_trial_json(trial) for trial in trials],
    }
    if args.json:
        return print_json(result)
    counts = ", ".join(f"{status} {n}" for status, n in result["trials_by_status"].items())
    best = "-"
    if result["best_reward"] is not None:
        best = (
            f"{number(result['best_reward'])}  trial {result['best_trial']}  "
            f"pattern {result['best_hash'][:12]}"
        )
    print(f"search {result['name']}")
    print_fields(
        [
            ("status", result["status"]),
            ("space", result["space"]),
            ("dataset", result["dataset"]),
            ("model", result["model"]),
            ("host", result["host"] or "-"),
            ("started", result["started_at"]),
            ("finished", result["finished_at"] or "-"),
            ("trials", f"{result['trials']} ({counts})" if counts else "0"),
            ("best so far", best),
            *([("error", result["error"])] if result["error"] else []),
            ("controller", json.dumps(result["controller_settings"], sort_keys=True)),
        ]
    )
    _print_trials(result["trial_table"])
    if args.png:
        print(f"\nreward curve plotted to {args.png}")
    return 0


def _trial_json(trial: Any) -> dict[str, Any]:
    epochs = [step["epoch"] for step in trial.metrics if "epoch" in step]
    return {"trial": trial.trial_id, "status": str(trial.status), "reward": trial.reward,
            "epochs": int(max(epochs)) if epochs else len(trial.metrics),
            "pattern": trial.pattern_hash, "error": trial.error}


def _print_trials(trials: list[dict[str, Any]]) -> None:
    print(f"\ntrials ({len(trials)}, in the order recorded):")
    if not trials:
        print("  none")
        return
    print_table(
        ("TRIAL", "STATUS", "REWARD", "EPOCHS", "PATTERN", "ERROR"),
        [(t["trial"], t["status"], number(t["reward"]), str(t["epochs"]), t["pattern"][:12],
          (t["error"] or "")[:60]) for t in trials],
        right=("REWARD", "EPOCHS"),
        indent="  ",
    )


def _reward_curve(trials: Sequence[Any]) -> list[dict[str, Any]]:
    curve, best = [], None
    for trial in trials:
        if trial.status == TrialState.COMPLETED and trial.reward is not None:
            best = trial.reward if best is None else max(best, trial.reward)
        curve.append(
            {
                "trial": trial.trial_id,
                "status": trial.status,
                "reward": trial.reward,
                "best_so_far": best,
            }
        )
    return curve


def _plot_curve(name: str, curve: list[dict[str, Any]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    done = [
        (i, p["reward"])
        for i, p in enumerate(curve, 1)
        if p["status"] == TrialState.COMPLETED and p["reward"] is not None
    ]
    best = [(i, p["best_so_far"]) for i, p in enumerate(curve, 1) if p["best_so_far"] is not None]
    if done:
        ax.scatter(*zip(*done, strict=True), s=10, alpha=0.5, label="completed trial")
        ax.step(*zip(*best, strict=True), where="post", color="C3", label="best so far")
        ax.legend(loc="lower right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole numbers
    ax.set_xlabel("trial (in order recorded)")
    ax.set_ylabel("reward")
    ax.set_title(f"search {name}: reward over trials")
    ax.grid(alpha=0.3)
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as error:
        raise BadInput(f"--png: cannot write {path} ({error.strerror})") from None


