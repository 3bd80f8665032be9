"""The search service: a controller, Ray Tune workers and the pattern store, wired together.

``run_search(SearchOptions(...))`` is what ``autodropout search`` runs. Everything that can
be wrong with the input is checked on the driver before Ray starts and before anything is
written, and raised as :class:`~autodropout.errors.BadInput`: the options, the space, the
resume and warm-start names, the dataset's files, and everything a trial would reject (the
budget against the dataset's size, the model name and its kind of data and patterns, every
site's ``modules:`` glob against the child model, built once on the meta device).

How a search ends (:class:`~patterns_db.states.SearchState`):

* ``COMPLETED``: every wanted trial finished and at most :data:`FAILED_FRACTION` of them
  failed;
* ``FAILED``: every wanted trial finished but more than :data:`FAILED_FRACTION` of them
  failed (so a search whose trials all failed never reports success), or the driver
  raised; :attr:`SearchResult.error` holds the first trial's error;
* ``STOPPED``: interrupted (Ctrl-C); ``autodropout search --resume NAME`` continues it.

Schedulers (``--scheduler``): ``none`` (the default) gives every trial the whole budget;
``asha`` is Ray Tune's ``ASHAScheduler`` (one bracket, ``max_t`` = the budget's epochs,
``--asha-grace`` epochs before a trial may be stopped, ``--asha-reduction`` between rungs):
most patterns get a short budget, promising ones continue. The scheduler's settings (and
its rungs) are stored with the search's controller settings, ``--resume`` keeps them, and
the controller learns by the rung rule of :mod:`controller.outcome`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autodropout.errors import BadInput
from autodropout.validation import check_int, check_real
from patterns_db.states import SearchState, TrialState

from .outcome import asha_rungs
from .preflight import budget_field, check_space, check_trial_setup, load_data, make_budget
from .registry import ASHA_DEFAULTS, CONTROLLERS, SCHEDULERS

EXPERIMENT_SAVE_PERIOD_S = 1.0
FAILED_FRACTION = 0.5
"""A finished search with more than this fraction of its finished trials failed is
``FAILED``, not ``COMPLETED`` (so is one whose trials all failed)."""
SEED_RANGE = 2**31
"""Without ``--seed`` a search draws its seed from ``secrets`` in ``[0, SEED_RANGE)``."""


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
    seed: int | None = None
    """``None``: a new search draws one (stored with it); a resumed one reuses its own."""
    train_examples: int | None = None
    data_dir: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    experiments_dir: str | None = None
    progress: bool = True
    scheduler: str | None = None
    """``none`` or ``asha``; ``None``: ``none`` for a new search, a resumed one keeps its own."""
    asha_grace: int | None = None
    """Epochs before ASHA may stop a trial (``None``: :data:`ASHA_DEFAULTS`)."""
    asha_reduction: float | None = None
    """ASHA's reduction factor, > 1 (``None``: :data:`ASHA_DEFAULTS`)."""


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
    trial_counts: dict[str, int] = field(default_factory=dict)
    """Trials by :class:`~patterns_db.states.TrialState` value."""
    error: str | None = None
    """The first failed trial's error, when any trial failed."""
    seed: int | None = None

    @property
    def failed_trials(self) -> int:
        return self.trial_counts.get(TrialState.FAILED.value, 0)


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C while the trials ran: the search is stored ``STOPPED``; :attr:`name` resumes it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


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
        seed = choose_seed(options, store)
        budget = make_budget(options, space, dataset, model)
        stored = store.get_search(options.resume).controller_settings if options.resume else None
        scheduler = scheduler_settings(options, space, budget, stored)
        name = resolve_name(options, store, space.name, dataset)
        data = load_data(options, dataset)
        check_trial_setup(space, budget, data, seed, options)
        controller = build_controller(options, space, store, seed)
        start_ray(options.address)
        return _search(options, space, budget, dataset, model, name, store, data, controller,
                       seed, scheduler)
    finally:
        store.close()


def check_options(options: SearchOptions) -> None:
    CONTROLLERS.canonical(options.controller)
    for label, value in (("--trials", options.trials), ("--concurrent", options.concurrent),
                         ("--epochs", options.epochs),
                         ("--train-examples", options.train_examples)):
        if value is not None:
            check_int(value, label, low=1, error=BadInput)
    if options.seed is not None:
        check_int(options.seed, "--seed", low=0, error=BadInput)
    if options.resume and options.name and options.name != options.resume:
        raise BadInput("--name and --resume name different searches; pass one of them")
    if options.warm_start and CONTROLLERS.canonical(options.controller) != "rl":
        raise BadInput(f"--warm-start: the {options.controller} controller has no policy to "
                       "warm-start; use --controller rl")
    if options.scheduler is not None:
        SCHEDULERS.canonical(options.scheduler)
    if options.asha_grace is not None:
        check_int(options.asha_grace, "--asha-grace", low=1, error=BadInput)
    if options.asha_reduction is not None:
        check_real(options.asha_reduction, "--asha-reduction", low=1, low_open=True,
                   error=BadInput)
    asha_flag = next((flag for flag, value in (("--asha-grace", options.asha_grace),
                                                ("--asha-reduction", options.asha_reduction))
                      if value is not None), None)
    if asha_flag and not options.resume and (options.scheduler or "none") != "asha":
        raise BadInput(f"{asha_flag} sets the ASHA scheduler; add --scheduler asha")


SCHEDULER_FLAGS = (("--scheduler", "scheduler"), ("--asha-grace", "asha_grace"),
                   ("--asha-reduction", "asha_reduction"))
"""The scheduler's flags and their keys in the stored controller settings."""


def scheduler_settings(options: SearchOptions, space, budget: dict[str, Any],
                       stored: dict[str, Any] | None = None) -> dict[str, Any]:
    """The scheduler's settings, as stored with the search: ``{"scheduler": "none"}`` or
    ASHA's ``scheduler``, ``asha_grace``, ``asha_reduction``, ``asha_max_t`` (the budget's
    epochs) and ``asha_rungs`` (:func:`~controller.outcome.asha_rungs`). A resumed search
    (``stored``: its controller settings) keeps its own; a flag that says otherwise is
    :class:`BadInput`, as is a grace period that leaves ASHA no rung before the budget ends."""
    if stored is not None:
        keys = ("scheduler", "asha_grace", "asha_reduction", "asha_max_t", "asha_rungs")
        kept = {"scheduler": "none", **{key: stored[key] for key in keys if key in stored}}
        for flag, key in SCHEDULER_FLAGS:
            given = getattr(options, key)
            if given is not None and given != kept.get(key):
                was = kept.get(key, "unset")
                raise BadInput(f"{flag}: search {options.resume!r} was started with {key} "
                               f"{was}; a resumed search keeps its scheduler")
        return kept
    if SCHEDULERS.canonical(options.scheduler or "none") == "none":
        return {"scheduler": "none"}
    grace = options.asha_grace if options.asha_grace is not None else ASHA_DEFAULTS["asha_grace"]
    reduction = (options.asha_reduction if options.asha_reduction is not None
                 else ASHA_DEFAULTS["asha_reduction"])
    epochs = budget["epochs"]
    if grace >= epochs:
        raise BadInput(f"--asha-grace: {grace} epochs leave ASHA no rung before the budget's "
                       f"{epochs} epochs ({budget_field(options, space, 'epochs')}); pass a "
                       "smaller --asha-grace or more --epochs")
    return {"scheduler": "asha", "asha_grace": grace, "asha_reduction": float(reduction),
            "asha_max_t": epochs, "asha_rungs": list(asha_rungs(grace, reduction, epochs))}


def make_scheduler(settings: dict[str, Any]):
    """The Tune scheduler of :func:`scheduler_settings`' ``settings`` (``None``: Tune's
    default FIFO, every trial runs its whole budget)."""
    if settings.get("scheduler", "none") == "none":
        return None
    return SCHEDULERS.get("asha")(
        time_attr="epoch", metric="reward", mode="max",
        max_t=settings["asha_max_t"], grace_period=settings["asha_grace"],
        reduction_factor=settings["asha_reduction"], brackets=1)


def new_task(options: SearchOptions):
    """The space, dataset and model a new search trains, from its options and the space."""
    import search_spaces

    space = search_spaces.load(options.space)
    dataset, model = check_space(space, dataset=options.dataset, model=options.model)
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


def choose_seed(options: SearchOptions, store) -> int:
    """``--seed``, else a fresh random seed; a resumed search keeps the seed it was started
    with (a different ``--seed`` is an error)."""
    if options.resume:
        stored = store.get_search(options.resume).controller_settings.get("seed", 0)
        if options.seed is not None and options.seed != stored:
            raise BadInput(f"--seed: search {options.resume!r} was started with seed {stored}; "
                           "a resumed search keeps its seed")
        return stored
    return options.seed if options.seed is not None else secrets.randbelow(SEED_RANGE)


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


def build_controller(options: SearchOptions, space, store, seed: int):
    """The controller, warm-started from ``--warm-start NAME``'s stored policy (an unknown
    name, a search without a policy or one over another space is :class:`BadInput`)."""
    from autodropout.errors import NotFound

    from .controllers import RLController, deserialize_state

    controller_class = CONTROLLERS.get(options.controller)
    if issubclass(controller_class, RLController):
        settings = {**space.controller, **options.controller_settings}
        settings.pop("reward", None)  # informational, not a policy setting
        controller = controller_class(space, seed=seed, **settings)
    else:
        controller = controller_class(space, seed=seed)
    if options.warm_start and isinstance(controller, RLController):
        try:
            store.get_search(options.warm_start)
        except NotFound:
            raise BadInput(f"--warm-start: no search named {options.warm_start!r} in "
                           f"{store.url}") from None
        blob = store.load_controller_state(options.warm_start)
        if blob is None:
            raise BadInput(f"--warm-start: search {options.warm_start!r} has no controller state")
        try:
            controller.warm_start(deserialize_state(blob))
        except (RuntimeError, KeyError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise BadInput(f"--warm-start: the policy of search {options.warm_start!r} does not "
                           f"fit space {space.name!r} ({reason})") from None
    return controller


def _search(options, space, budget, dataset, model, name, store, data, controller,
            seed, scheduler) -> SearchResult:
    from .callbacks import ProgressCallback, StoreCallback
    from .searcher import PatternSearcher

    started = time.monotonic()
    searcher = PatternSearcher(controller, metric="reward", mode="max",
                               rungs=tuple(scheduler.get("asha_rungs", ())), time_attr="epoch")
    settings = {"controller": options.controller, "seed": seed, "trials": options.trials,
                **scheduler, **getattr(controller, "settings", {})}
    if options.resume:  # a resumed search keeps the settings it was started with
        settings = {**settings, **store.get_search(name).controller_settings}
    store.create_search(name, space.name, space.yaml_text, dataset, model, settings,
                        resume=bool(options.resume))
    callbacks = [StoreCallback(options.db, name, searcher)]
    if options.progress:
        callbacks.append(ProgressCallback(settings.get("trials", options.trials),
                                          concurrent=options.concurrent))
    tuner = build_tuner(options, space, budget, name, data, searcher, callbacks, seed)
    try:
        status = fit(tuner, store, name, options)
    except KeyboardInterrupt:
        raise SearchInterrupted(name) from None
    return finish_search(store, name, status, time.monotonic() - started, seed)


def build_tuner(options: SearchOptions, space, budget: dict[str, Any], name: str, data,
                searcher, callbacks: list, seed: int):
    """A new Tuner over ``searcher``'s trials, or the interrupted one restored (``--resume``)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from workers.trainable import make_trainable

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our progress bar replaces Tune's tables
    # Save the experiment (trials, searcher, callbacks) every second rather than every 10 s:
    # `--resume` after a killed driver then redoes at most a second of bookkeeping, and
    # StoreCallback records a trial only once a save holds it. A save takes ~10 ms.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(EXPERIMENT_SAVE_PERIOD_S))
    quiet_restore_hint()
    # The trials get the space parsed here (never a path to look up again from their own
    # working directory) and the dataset loaded here, through the object store.
    trainable = tune.with_resources(
        make_trainable(data, space), {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial})
    root = experiments_root(options)
    root.mkdir(parents=True, exist_ok=True)
    if options.resume:
        return tune.Tuner.restore(str(root / name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    scheduler = scheduler_settings(options, space, budget)
    return tune.Tuner(
        trainable,
        param_space={"space": space.name, "seed": seed, "budget": budget,
                     "validate_at": scheduler.get("asha_rungs", [])},
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=options.concurrent),
            num_samples=options.trials,
            scheduler=make_scheduler(scheduler),
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


def quiet_restore_hint() -> None:
    """Drop Tune's "Resume experiment with: Tuner.restore(...)" warning: the CLI prints its
    own ``autodropout search --resume NAME``."""
    logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoRestoreHint) for f in logger.filters):
        logger.addFilter(_NoRestoreHint())


class _NoRestoreHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def fit(tuner, store, name: str, options: SearchOptions) -> SearchState:
    """Run the trials; the search ends ``COMPLETED`` once every wanted trial finished (and
    at most :data:`FAILED_FRACTION` of them failed, else ``FAILED``), ``STOPPED`` when
    interrupted (``--resume`` continues it), ``FAILED`` on an error."""
    status = SearchState.FAILED
    try:
        tuner.fit()
        # a resumed search keeps the trial count it was started with
        wanted = store.get_search(name).controller_settings.get("trials", options.trials)
        status = final_state(store.search_summary(name).trial_counts, wanted)
    except KeyboardInterrupt:
        status = SearchState.STOPPED
        raise
    finally:
        end_search(store, name, status)
    return status


def final_state(counts: dict[str, int], wanted: int) -> SearchState:
    """How a search whose fit returned ends, from its trials by state; see the module
    docstring."""
    finished = sum(count for state, count in counts.items() if state != TrialState.RUNNING)
    if finished < wanted:
        return SearchState.STOPPED
    failed = counts.get(TrialState.FAILED.value, 0)
    return SearchState.FAILED if failed > FAILED_FRACTION * finished else SearchState.COMPLETED


def first_error(store, name: str) -> str | None:
    """The error of the search's first failed trial (in trial order), if any."""
    for trial in store.trials(name, with_metrics=False):
        if trial.status == TrialState.FAILED:
            return trial.error or "the trial failed"
    return None


def end_search(store, name: str, status: SearchState) -> None:
    """Store the search's end; a failed search keeps its first trial error."""
    error = first_error(store, name) if status is SearchState.FAILED else None
    store.finish_search(name, status, error=error)


def finish_search(store, name: str, status: SearchState, elapsed: float,
                  seed: int | None = None) -> SearchResult:
    """Tag the search's best pattern ``NAME-best`` and sum the search up."""
    summary = store.search_summary(name)
    if summary.best_pattern_hash:
        store.tag(summary.best_pattern_hash, f"{name}-best")
    counts = {str(state): count for state, count in summary.trial_counts.items()}
    return SearchResult(name, status, summary.trials, summary.best_reward,
                        summary.best_pattern_hash, elapsed, store.best(5, search=name),
                        trial_counts=counts, error=first_error(store, name), seed=seed)


def finished_trials(store, name: str) -> int:
    counts = store.search_summary(name).trial_counts
    return sum(count for status, count in counts.items() if status != TrialState.RUNNING)
