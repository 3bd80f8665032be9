"""Tune callbacks of the search driver: write trials to the store, show progress.

Both are pickled with the Tuner (``tuner.pkl``) so that ``--resume`` restores them: they keep
the database URL *as the user gave it* (``None`` when it comes from ``AUTODROPOUT_DB``, so
credentials in the environment never reach the experiment directory) and reopen the store
after unpickling.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from autodropout.patterns import Pattern
from autodropout.validation import is_real
from patterns_db.states import TrialState

from .controllers import serialize_state
from .outcome import trial_outcome


class StoreCallback(Callback):
    """Records every trial in the pattern store as it reports and as it ends, and keeps the
    controller's state next to the search after each ending trial."""

    def __init__(self, db: str | None, search: str, searcher) -> None:
        self.db = db
        self.search = search
        self.searcher = searcher
        self.metrics: dict[str, list[dict[str, float]]] = {}
        self.experiment_saves = 0
        self.started_at_save: dict[str, int] = {}
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from patterns_db import PatternStore

            self._store = PatternStore(self.db)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    def get_state(self) -> dict[str, Any]:
        """Checkpointed by Tune with the experiment, so a resumed trial keeps its history."""
        self.experiment_saves += 1  # Tune calls this as it saves the experiment, trials included
        return {"metrics": self.metrics}

    def set_state(self, state: dict[str, Any]) -> None:
        self.metrics = state["metrics"]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = {key: float(value) for key, value in result.items()
                if is_real(value) and key in _STEP_METRICS}
        history = self.metrics.get(trial.trial_id, [])
        step["step"] = float(result.get("training_iteration", len(history) + 1))
        # A retried or resumed trial starts again from its first step (or its checkpoint's):
        # keep the history of the attempt that counts.
        history = [earlier for earlier in history if earlier["step"] < step["step"]]
        self.metrics[trial.trial_id] = [*history, step]
        # A trial that Tune has not saved yet would be unknown to a resumed search if the driver
        # died now: record it from its next report on (each record holds the whole history).
        if self.started_at_save.get(trial.trial_id, -1) < self.experiment_saves:
            self._record(trial, result, TrialState.RUNNING)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started_at_save[trial.trial_id] = self.experiment_saves

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        metric = self.metric
        outcome = trial_outcome(result, metric=metric)
        error = f"the trial reported no {metric!r}" if outcome is TrialState.FAILED else None
        self._record(trial, result, outcome, error=error)
        self._save_controller()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._record(trial, trial.last_result or {}, TrialState.FAILED, error=_error_text(trial))
        self._save_controller()

    @property
    def metric(self) -> str:
        """The searcher's metric: the reward the outcome rule looks for."""
        return getattr(self.searcher, "metric", None) or "reward"

    def _record(self, trial, result: dict[str, Any], status: TrialState,
                error: str | None = None) -> None:
        reward = result.get("reward")
        if reward is not None and (not isinstance(reward, Real) or not math.isfinite(reward)):
            reward = None
        if error is None and result.get("diverged"):
            error = f"diverged: {result.get('reason', 'non-finite loss')}"
        self.store.record_trial(
            self.search,
            trial.trial_id,
            Pattern.from_json(trial.config["pattern"]),
            reward=None if status is TrialState.FAILED else reward,
            metrics=self.metrics.get(trial.trial_id, ()),
            status=status,
            error=error,
            duration=result.get("time_total_s"),
            node=result.get("node") or result.get("hostname"),
        )

    def _save_controller(self) -> None:
        self.store.save_controller_state(self.search, serialize_state(self.searcher.controller))


_STEP_METRICS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_perplexity", "reward")


def _error_text(trial) -> str:
    error = None
    try:
        error = trial.get_error()
    except Exception:  # older/newer Tune: fall back to the error file below
        error = None
    text = str(error) if error else ""
    path = getattr(trial, "error_file", None)
    if not text and path:
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                text = file.read()
        except OSError:
            text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "the trial failed") [:2000]


class ProgressCallback(Callback):
    """A progress bar on stderr, from the search's start: trials finished/total, the running
    trials with their current epoch and metric (as Tune reports them), completed and failed
    counts apart, the best reward so far, the elapsed time and a remaining-time estimate.

    The estimate counts work in epochs: a running trial at epoch 2 of 3 is two thirds done,
    so it is meaningful before the first trial ends and with trials running concurrently;
    the rate is what this driver achieved since it started (a resumed search does not count
    its earlier trials as done in no time). State comes from Tune's own trial list and this
    callback's record of each trial's end, so a resumed search starts where it was.

    A trial a scheduler (ASHA) stopped counts as finished work, shown apart ("N
    early-stopped"); the best reward so far is of completed (full-budget) trials only.
    """

    METRICS = ("reward", "val_accuracy", "val_perplexity", "val_loss")

    def __init__(self, total: int, concurrent: int | None = None, clock=None) -> None:
        self.total = total
        self.concurrent = concurrent
        self.best: float | None = None
        self.completed: set[str] = set()
        self.failed: set[str] = set()
        self.early_stopped: set[str] = set()
        """The trials of :attr:`completed` a scheduler stopped before their last epoch."""
        self.running: dict[str, dict[str, float]] = {}
        self._clock = clock
        self._started: float | None = None
        self._done_at_start: float | None = None
        self._bar = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None, "_clock": None, "_started": None,
                "_done_at_start": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"early_stopped": set(), **state})  # pickled before it existed

    # -- state ---------------------------------------------------------------------------
    def now(self) -> float:
        import time

        return (self._clock or time.monotonic)()

    @property
    def finished(self) -> int:
        return len(self.completed) + len(self.failed)

    def work_done(self) -> float:
        """Finished trials plus the finished fraction (epochs) of every running trial."""
        partial = sum(min(step.get("epoch", 0) / step["epochs"], 1.0)
                      for step in self.running.values() if step.get("epochs"))
        return self.finished + partial

    def eta(self) -> float | None:
        """Seconds left at the rate of work since this driver started; ``None`` before any
        work was done."""
        if self._started is None:
            return None
        done = self.work_done() - (self._done_at_start or 0.0)
        elapsed = self.now() - self._started
        if done <= 0 or elapsed <= 0:
            return None
        return max(self.total - self.work_done(), 0.0) * elapsed / done

    def elapsed(self) -> float:
        return 0.0 if self._started is None else self.now() - self._started

    def describe(self) -> str:
        """The text after the bar: running trials, counts, best, ETA."""
        parts = []
        for step in self.running.values():
            if "epoch" in step:
                epoch = f"e{step['epoch']:g}/{step['epochs']:g}" if step.get("epochs") \
                    else f"e{step['epoch']:g}"
                metric = next((f" {name} {step[name]:.3f}" for name in self.METRICS
                               if name in step), "")
                parts.append(epoch + metric)
            else:
                parts.append("starting")
        early = len(self.early_stopped)
        counts = f"{len(self.completed) - early} completed, {len(self.failed)} failed"
        if early:
            counts += f", {early} early-stopped"
        running = f"running {len(self.running)}" + (f" [{'; '.join(parts)}]" if parts else "")
        best = "best -" if self.best is None else f"best {self.best:.4f}"
        eta = self.eta()
        return f"{running}, {counts}, {best}, ETA {'?' if eta is None else _clock_text(eta)}"

    def _sync(self, trials) -> None:
        """Learn the trials that ended before this driver started (a resume)."""
        for trial in trials:
            if trial.trial_id in self.completed or trial.trial_id in self.failed:
                continue
            if trial.status == Trial.ERROR:
                self.failed.add(trial.trial_id)
            elif trial.status == Trial.TERMINATED:
                self._end(trial, trial_outcome(trial.last_result or {}, metric="reward"))

    def _start(self, trials=()) -> None:
        if self._started is None:
            self._sync(trials)
            self._started = self.now()
            self._done_at_start = self.work_done()

    def _end(self, trial, outcome: TrialState) -> None:
        self.running.pop(trial.trial_id, None)
        if outcome is TrialState.FAILED:
            self.failed.add(trial.trial_id)
            return
        self.completed.add(trial.trial_id)
        if outcome is TrialState.EARLY_STOPPED:
            self.early_stopped.add(trial.trial_id)
        reward = (trial.last_result or {}).get("reward")
        if outcome is TrialState.COMPLETED and isinstance(reward, Real) \
                and math.isfinite(reward) and (self.best is None or reward > self.best):
            self.best = float(reward)

    # -- display -------------------------------------------------------------------------
    def _show(self) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=self.total, initial=self.finished, unit="trial",
                             desc="search", dynamic_ncols=True, leave=True,
                             bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| "
                                        "[{elapsed}{postfix}]")
            self._bar.start_t -= self.elapsed()
        self._bar.set_postfix_str(self.describe(), refresh=False)
        self._bar.update(self.finished - self._bar.n)
        self._bar.refresh()
        if self.finished >= self.total:
            self._bar.close()

    # -- Tune hooks ----------------------------------------------------------------------
    def setup(self, *args, **info) -> None:
        self._start()
        self._show()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._start(trials)
        self.running.setdefault(trial.trial_id, {})
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._start(trials)
        self.running[trial.trial_id] = {
            key: float(value) for key, value in result.items()
            if key in ("epoch", "epochs", *self.METRICS) and is_real(value)}
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._start(trials)
        self._end(trial, trial_outcome(trial.last_result or {}, metric="reward"))
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._start(trials)
        self._end(trial, TrialState.FAILED)
        self._show()

    def on_experiment_end(self, trials, **info) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"
