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
                if isinstance(value, Real) and not isinstance(value, bool) and key in _STEP_METRICS}
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
    """A progress bar: trials done/total, best reward so far, elapsed and remaining time.

    Progress is counted from Tune's own trial list, so a resumed search starts where it was.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.best: float | None = None
        self._bar = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None}

    def _advance(self, trials, trial, reward: float | None) -> None:
        from tqdm import tqdm

        if reward is not None and (self.best is None or reward > self.best):
            self.best = reward
        # the ending trial's own status is set after the callbacks run
        done = 1 + sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials if t is not trial)
        if self._bar is None:
            self._bar = tqdm(total=self.total, unit="trial", desc="search", dynamic_ncols=True)
        self._bar.set_postfix_str("best reward -" if self.best is None else f"best reward {self.best:.4f}")
        self._bar.update(done - self._bar.n)
        if done >= self.total:
            self._bar.close()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        counts = trial_outcome(result, metric="reward") is TrialState.COMPLETED
        self._advance(trials, trial, result["reward"] if counts else None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._advance(trials, trial, None)
