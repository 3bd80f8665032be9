"""``PatternSearcher``: a controller plugged into Ray Tune as a ``Searcher``.

Ray Tune asks :meth:`suggest` for a config per trial and reports each trial's end to
:meth:`on_trial_complete`. Reward rules (documented in the README):

* a trial whose last result has ``final: True`` gives ``reward = result[metric]`` (negated
  for ``mode="min"``) and updates the controller;
* a trial that failed after its retries arrives with ``error=True`` and no result: it is not
  the pattern's fault as far as we can tell (a lost node, a killed worker), so it is left out
  of the policy update; a pattern that makes training diverge is reported by the trainable
  as a *completed* trial with reward 0 (``diverged: True``) and does update the policy;
* a trial stopped early by a scheduler (ASHA) ends without ``final: True``: its reward is
  for a shorter budget than the others', so it is left out of the policy update.
"""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.search import Searcher

from .controllers import Controller, Suggestion


class PatternSearcher(Searcher):
    """Proposes ``{"pattern": <canonical JSON>, "tokens": [...]}`` configs from a controller."""

    def __init__(self, controller: Controller, metric: str = "reward", mode: str = "max") -> None:
        super().__init__(metric=metric, mode=mode)
        self.controller = controller
        self.live: dict[str, Suggestion] = {}
        self.outcomes: dict[str, str] = {}

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
        if outcome == "completed":
            reward = float(result[self._metric])
            self.controller.observe(suggestion, reward if self._mode == "max" else -reward)

    def outcome(self, result: dict | None, error: bool) -> str:
        if error or not result or self._metric not in result:
            return "failed"
        return "completed" if result.get("final") else "early-stopped"

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
