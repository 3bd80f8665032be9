"""``PatternSearcher``: a controller plugged into Ray Tune as a ``Searcher``.

Ray Tune asks :meth:`suggest` for a config per trial and reports each trial's end to
:meth:`on_trial_complete`, which asks :func:`~controller.outcome.trial_outcome` how the
trial counts: only a ``COMPLETED`` trial's reward updates the controller (the rules are in
:mod:`controller.outcome`).
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.search import Searcher

from patterns_db.states import TrialState

from .controllers import Controller, Suggestion
from .outcome import trial_outcome


class PatternSearcher(Searcher):
    """Proposes ``{"pattern": <canonical JSON>, "tokens": [...]}`` configs from a controller."""

    def __init__(self, controller: Controller, metric: str = "reward", mode: str = "max") -> None:
        super().__init__(metric=metric, mode=mode)
        self.controller = controller
        self.live: dict[str, Suggestion] = {}
        self.outcomes: dict[str, TrialState] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        suggestion = self.controller.suggest()
        self.live[trial_id] = suggestion
        return {"pattern": suggestion.pattern.to_json(), "tokens": list(suggestion.tokens)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        suggestion = self.live.pop(trial_id, None)
        if suggestion is None:  # already handled before a restore
            return
        outcome = self.outcome(result, error)
        self.outcomes[trial_id] = outcome
        if outcome is TrialState.COMPLETED:
            reward = float(result[self._metric])
            self.controller.observe(suggestion, reward if self._mode == "max" else -reward)

    def outcome(self, result: dict | None, error: bool) -> TrialState:
        """:func:`~controller.outcome.trial_outcome` for this searcher's metric."""
        return trial_outcome(result, error, self._metric)

    # Tune checkpoints the searcher with save/restore and pickles it inside the Tuner: keep
    # both paths on the controller's explicit state (torch generators do not pickle).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        controller = state.pop("controller")
        state["controller_class"] = type(controller)
        state["controller_args"] = (controller.space, controller.seed, getattr(controller, "settings", {}))
        state["controller_state"] = controller.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        controller_class = state.pop("controller_class")
        space, seed, settings = state.pop("controller_args")
        controller = controller_class(space, seed, **settings)
        controller.load_state_dict(state.pop("controller_state"))
        self.__dict__.update(state)
        self.controller = controller

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__setstate__(pickle.load(file))
