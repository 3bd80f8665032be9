"""The search service: a controller, Ray Tune workers and the pattern store, wired together.

``run_search(SearchOptions(...))`` is what ``autodropout search`` runs. Everything that can
be wrong with the input (space, dataset, database, Ray address, resume name) is checked
before anything is written, and raised as :class:`~autodropout.errors.BadInput`.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autodropout.errors import BadInput
from autodropout.validation import check_int
from patterns_db.states import SearchState, TrialState

from .controllers import RLController, deserialize_state
from .registry import CONTROLLERS
from .searcher import PatternSearcher

EXPERIMENT_SAVE_PERIOD_S = 1.0


@dataclass
class SearchOptions:
    """The settings of one search; ``None`` means the space's ``budget:`` default."""

    space: str = "convnet"
    dataset: str | None = None
    model: str | None = None
    trials: int = 20
    concurrent: int = 2
    epochs: int | None = None
    controller: str = "rl"
    controller_settings: dict[str, Any] = field(default_factory=dict)
    address: str | None = None
    db: str | None = None
    name: str | None = None
    resume: str | None = None
    warm_start: str | None = None
    seed: int = 0
    data_dir: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    experiments_dir: str | None = None
    progress: bool = True


@dataclass
class SearchResult:
    name: str
    status: SearchState
    trials: int
    best_reward: float | None
    best_hash: str | None
    elapsed: float
    best: list = field(default_factory=list)
    """The top patterns of this search (``RankedPattern`` records), best first."""


def experiments_root(options: SearchOptions) -> Path:
    if options.experiments_dir:
        return Path(options.experiments_dir).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "autodropout" / "experiments"


def run_search(options: SearchOptions) -> SearchResult:
    from patterns_db import PatternStore

    check_options(options)
    task = None if options.resume else new_task(options)  # bad input fails before the store opens
    store = PatternStore(options.db)
    try:
        space, dataset, model = task or resumed_task(options, store)
        budget = {**space.budget, "dataset": dataset, "model": model}
        if options.epochs is not None:
            budget["epochs"] = options.epochs
        name = resolve_name(options, store, space.name, dataset)
        start_ray(options.address)
        return _search(options, space, budget, dataset, model, name, store)
    finally:
        store.close()


def check_options(options: SearchOptions) -> None:
    CONTROLLERS.canonical(options.controller)
    for label, value in (("--trials", options.trials), ("--concurrent", options.concurrent),
                         ("--epochs", options.epochs)):
        if value is not None:
            check_int(value, label, low=1, error=BadInput)
    if options.resume and options.name and options.name != options.resume:
        raise BadInput("--name and --resume name different searches; pass one of them")


def new_task(options: SearchOptions):
    """The space, dataset and model a new search trains, from its options and the space."""
    import search_spaces
    from workers.registry import DATASETS

    space = search_spaces.load(options.space)
    dataset = options.dataset or space.budget.get("dataset")
    model = options.model or space.budget.get("model")
    DATASETS.canonical(dataset)
    return space, dataset, model


def resumed_task(options: SearchOptions, store):
    """A resumed search trains what it trained before: its space (as it was then), dataset and
    model come from the store, so ``--resume NAME`` needs no other flag."""
    import search_spaces
    from autodropout.errors import NotFound

    try:
        record = store.get_search(options.resume)
    except NotFound:
        raise BadInput(f"--resume: no search named {options.resume!r} in {store.url}") from None
    for flag, given, stored in (("--dataset", options.dataset, record.dataset),
                                ("--model", options.model, record.model)):
        if given and given != stored:
            raise BadInput(f"{flag}: search {record.name!r} trains on {stored!r}, not {given!r}")
    space = search_spaces.parse(record.space_yaml, source=f"search {record.name!r}")
    return space, record.dataset, record.model


def resolve_name(options: SearchOptions, store, space_name: str, dataset: str) -> str:
    from autodropout.errors import NotFound

    if options.resume:
        try:
            store.get_search(options.resume)
        except NotFound:
            raise BadInput(f"--resume: no search named {options.resume!r} in {store.url}") from None
        if not (experiments_root(options) / options.resume).is_dir():
            raise BadInput(
                f"--resume: no Tune experiment for {options.resume!r} under {experiments_root(options)}"
            )
        return options.resume
    if options.name:
        try:
            store.get_search(options.name)
        except NotFound:
            return options.name
        raise BadInput(f"--name: a search named {options.name!r} exists; use --resume {options.name}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{space_name}-{dataset}-{stamp}"


def start_ray(address: str | None) -> None:
    """Join the cluster at ``address`` ("auto" or HOST:PORT) or start a local Ray."""
    import ray

    if address and address != "auto":
        check_reachable(address)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or "a local Ray"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInput(f"--address: cannot reach Ray at {where}: {reason}") from None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address nothing listens at (ray.init would retry for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--address: expected auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise BadInput(f"--address: cannot reach Ray at {address}: {reason}") from None


def build_controller(options: SearchOptions, space, store, name: str):
    controller_class = CONTROLLERS.get(options.controller)
    if issubclass(controller_class, RLController):
        settings = {**space.controller, **options.controller_settings}
        settings.pop("reward", None)  # informational, not a policy setting
        controller = controller_class(space, seed=options.seed, **settings)
    else:
        controller = controller_class(space, seed=options.seed)
    if options.warm_start and isinstance(controller, RLController):
        blob = store.load_controller_state(options.warm_start)
        if blob is None:
            raise BadInput(f"--warm-start: search {options.warm_start!r} has no controller state")
        controller.warm_start(deserialize_state(blob))
    return controller


def _search(options, space, budget, dataset, model, name, store) -> SearchResult:
    from workers.datasets import load_dataset

    from .callbacks import ProgressCallback, StoreCallback

    started = time.monotonic()
    data = load_dataset(dataset, data_dir=options.data_dir)
    controller = build_controller(options, space, store, name)
    searcher = PatternSearcher(controller, metric="reward", mode="max")
    settings = {"controller": options.controller, "seed": options.seed, "trials": options.trials,
                **getattr(controller, "settings", {})}
    store.create_search(name, space.name, space.yaml_text, dataset, model, settings,
                        resume=bool(options.resume))
    callbacks = [StoreCallback(options.db, name, searcher)]
    if options.progress:
        callbacks.append(ProgressCallback(options.trials))
    tuner = build_tuner(options, space, budget, name, data, searcher, callbacks)
    status = fit(tuner, store, name, options)
    return finish_search(store, name, status, time.monotonic() - started)


def build_tuner(options: SearchOptions, space, budget: dict[str, Any], name: str, data,
                searcher: PatternSearcher, callbacks: list):
    """A new Tuner over ``searcher``'s trials, or the interrupted one restored (``--resume``)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from workers.trainable import make_trainable

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our progress bar replaces Tune's tables
    # Save the experiment (trials, searcher, callbacks) every second rather than every 10 s:
    # `--resume` after a killed driver then redoes at most a second of bookkeeping, and
    # StoreCallback records a trial only once a save holds it. A save takes ~10 ms.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(EXPERIMENT_SAVE_PERIOD_S))
    trainable = tune.with_resources(
        make_trainable(data), {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial})
    root = experiments_root(options)
    root.mkdir(parents=True, exist_ok=True)
    if options.resume:
        return tune.Tuner.restore(str(root / name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    return tune.Tuner(
        trainable,
        param_space={"space": portable_space_ref(space), "seed": options.seed, "budget": budget},
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=options.concurrent),
            num_samples=options.trials,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(root),
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            verbose=0,
        ),
    )


def fit(tuner, store, name: str, options: SearchOptions) -> SearchState:
    """Run the trials; the search ends ``COMPLETED`` once every wanted trial finished,
    ``STOPPED`` when interrupted (``--resume`` continues it), ``FAILED`` on an error."""
    status = SearchState.FAILED
    try:
        tuner.fit()
        # a resumed search keeps the trial count it was started with
        wanted = store.get_search(name).controller_settings.get("trials", options.trials)
        status = SearchState.COMPLETED if finished_trials(store, name) >= wanted \
            else SearchState.STOPPED
    except KeyboardInterrupt:
        status = SearchState.STOPPED
        raise
    finally:
        store.finish_search(name, status)
    return status


def finish_search(store, name: str, status: SearchState, elapsed: float) -> SearchResult:
    """Tag the search's best pattern ``NAME-best`` and sum the search up."""
    summary = store.search_summary(name)
    if summary.best_pattern_hash:
        store.tag(summary.best_pattern_hash, f"{name}-best")
    return SearchResult(name, status, summary.trials, summary.best_reward,
                        summary.best_pattern_hash, elapsed, store.best(5, search=name))


def portable_space_ref(space) -> str:
    """A shipped space by name (its path differs between nodes), a user's file by path."""
    from search_spaces.loader import SPACES_DIR

    return space.name if Path(space.source).resolve().parent == SPACES_DIR else space.source


def finished_trials(store, name: str) -> int:
    counts = store.search_summary(name).trial_counts
    return sum(count for status, count in counts.items() if status != TrialState.RUNNING)
