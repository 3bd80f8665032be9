"""``autodropout search``: run a pattern search on this machine or on a Ray cluster."""

from __future__ import annotations

import argparse
import sys

from controller.registry import ASHA_DEFAULTS, CONTROLLERS, SCHEDULERS


def register(commands: argparse._SubParsersAction) -> None:
    search = commands.add_parser(
        "search",
        help="search dropout patterns with an RL (or random) controller on Ray",
        description="Search dropout patterns: the controller proposes patterns, Ray Tune workers "
        "train child models with them, every trial goes to the pattern store.",
    )
    search.add_argument("--space", default="convnet", help="space name or YAML path (default: convnet)")
    search.add_argument("--dataset", help="dataset (default: the space's budget.dataset)")
    search.add_argument("--model", help="child model: wrn or gpt (default: the space's budget.model)")
    search.add_argument("--trials", type=int, default=20, help="number of trials (default: 20)")
    search.add_argument("--concurrent", type=int, default=2, help="trials at once (default: 2)")
    search.add_argument("--epochs", type=int, help="epochs per trial (default: the space's budget)")
    search.add_argument("--train-examples", type=int, metavar="N",
                        help="training examples (tokens for text) per trial (default: the "
                        "space's budget.train_examples)")
    search.add_argument("--controller", choices=CONTROLLERS.names(), default="rl")
    search.add_argument("--scheduler", choices=SCHEDULERS.names(),
                        help="trial scheduler: none (default: every trial trains the whole "
                        "budget) or asha (most patterns get a short budget, promising ones "
                        "continue; the controller learns from each rung's rewards against that "
                        "rung's own baseline); --resume keeps the search's")
    search.add_argument("--asha-grace", type=int, metavar="N",
                        help=f"epochs every trial trains before ASHA may stop it (default: "
                        f"{ASHA_DEFAULTS['asha_grace']}; below the budget's epochs)")
    search.add_argument("--asha-reduction", type=float, metavar="F",
                        help=f"ASHA's reduction factor, > 1: rungs at N, N*F, N*F^2, ... epochs, "
                        f"about 1/F of a rung's trials go on (default: "
                        f"{ASHA_DEFAULTS['asha_reduction']:g})")
    search.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray)")
    search.add_argument("--db", help="pattern store URL (default: $AUTODROPOUT_DB or the local SQLite file)")
    search.add_argument("--name", help="search name (default: SPACE-DATASET-TIMESTAMP)")
    search.add_argument("--resume", metavar="NAME", help="continue an interrupted search")
    search.add_argument("--warm-start", metavar="NAME", help="start from the policy of an earlier search")
    search.add_argument("--seed", type=int, help="seed of the controller and the trials (default: "
                        "drawn at random and stored with the search; --resume keeps it)")
    search.add_argument("--data-dir", help="dataset folder (default: $AUTODROPOUT_DATA_DIR or download)")
    search.add_argument("--cpus-per-trial", type=float, default=1.0)
    search.add_argument("--gpus-per-trial", type=float, default=0.0, help="e.g. 0.25 for four trials per GPU")
    search.add_argument("--experiments-dir", help="where Tune keeps experiment state (default: "
                        "$XDG_DATA_HOME/autodropout/experiments)")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="controller setting, e.g. --set lr=0.001 --set entropy_weight=0.01")
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    search.set_defaults(handler=run)


def parse_settings(pairs: list[str]) -> dict[str, float | int | str]:
    """``--set KEY=VALUE`` pairs, each parsed and checked by its row of the one settings table
    (:data:`search_spaces.settings.CONTROLLER_SETTINGS`; KEY: a setting with a default)."""
    from autodropout.errors import BadInput
    from search_spaces.settings import CONTROLLER_DEFAULTS, CONTROLLER_SETTINGS

    settings: dict[str, float | int | str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in CONTROLLER_DEFAULTS:
            raise BadInput(f"--set: expected KEY=VALUE with KEY one of "
                           f"{', '.join(CONTROLLER_DEFAULTS)}; got {pair!r}")
        settings[key] = CONTROLLER_SETTINGS[key].parse(raw, f"--set {key}", BadInput)
    return settings


def run(args: argparse.Namespace) -> int:
    from controller.service import SearchInterrupted, SearchOptions, run_search
    from patterns_db.states import SearchState, TrialState

    options = SearchOptions(
        space=args.space, dataset=args.dataset, model=args.model, trials=args.trials,
        concurrent=args.concurrent, epochs=args.epochs, controller=args.controller,
        controller_settings=parse_settings(args.set), address=args.address, db=args.db,
        name=args.name, resume=args.resume, warm_start=args.warm_start, seed=args.seed,
        train_examples=args.train_examples, data_dir=args.data_dir,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        experiments_dir=args.experiments_dir, progress=not args.quiet,
        scheduler=args.scheduler, asha_grace=args.asha_grace, asha_reduction=args.asha_reduction,
    )
    try:
        result = run_search(options)
    except SearchInterrupted as stopped:
        print_resume_hint(args, stopped.name)
        return 130
    counts = result.trial_counts
    finished = sum(count for state, count in counts.items() if state != TrialState.RUNNING)
    tally = f"{counts.get(TrialState.COMPLETED, 0)} completed, {result.failed_trials} failed"
    if counts.get(TrialState.EARLY_STOPPED):
        tally += f", {counts[TrialState.EARLY_STOPPED]} early-stopped"
    print(f"search {result.name}: {result.status}, {result.trials} trials ({tally}) "
          f"in {result.elapsed:.0f} s, seed {result.seed}")
    for rank, hit in enumerate(result.best, 1):
        print(f"  {rank}. reward {hit.reward:.4f}  pattern {hit.record.hash[:12]}  trial {hit.trial_id}")
    if result.best_hash:
        print(f"best pattern tagged {result.name}-best")
        print(f"export it: autodropout patterns export {result.name}-best -o pattern.json")
    if result.status is SearchState.STOPPED:
        print_resume_hint(args, result.name)
        return 130
    if result.status is SearchState.FAILED:
        print(f"autodropout: error: search {result.name} failed: {result.failed_trials} of "
              f"{finished} trials failed; first error: {result.error}", file=sys.stderr)
        return 1
    if result.error:
        print(f"autodropout: warning: {result.failed_trials} of {finished} trials failed; "
              f"first error: {result.error}", file=sys.stderr)
    return 0


def print_resume_hint(args: argparse.Namespace, name: str) -> None:
    """How to continue a stopped search: the same store and experiments folder, by name."""
    import shlex

    extra = [f"{flag} {shlex.quote(value)}" for flag, value in
             (("--db", args.db), ("--experiments-dir", args.experiments_dir)) if value]
    command = " ".join(["autodropout search --resume", shlex.quote(name), *extra])
    print(f"autodropout: search {name} stopped; continue it with: {command}", file=sys.stderr)
