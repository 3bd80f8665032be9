"""``PatternSearcher``: a controller plugged into Ray Tune as a ``Searcher``.

Ray Tune asks :meth:`suggest` for a config per trial and reports each trial's end to
:meth:`on_trial_complete`, which asks :func:`~controller.outcome.trial_outcome` how the
trial counts: a ``COMPLETED`` trial's final reward updates the controller. Under a
multi-fidelity scheduler (ASHA) the searcher is given the scheduler's ``rungs`` and the
controller also learns from each trial's reward at each rung it reached, through
:meth:`on_trial_result` (the rung rule; both rules are in :mod:`controller.outcome`).
"""

from __future__ import annotations

import inspect
import logging
import pickle
from typing import Any

from ray.tune.search import UNDEFINED_METRIC_MODE, Searcher
from ray.tune.search.variant_generator import parse_spec_vars

from autodropout.validation import is_real
from patterns_db.states import TrialState

from .controllers import Controller, Suggestion
from .outcome import TUNE_RESULT_KEY, trial_outcome

logger = logging.getLogger(__name__)

PROPOSED_KEYS = ("pattern", "tokens")
"""The config entries every suggestion sets."""


class PatternSearcher(Searcher):
    """Proposes ``{"pattern": <canonical JSON>, "tokens": [...]}`` configs from a controller.

    Use it as any Ray Tune searcher::

        searcher = PatternSearcher(RLController(search_spaces.load("tiny")),
                                   metric="reward", mode="max")
        tune.Tuner(trainable, param_space={"seed": 0},
                   tune_config=tune.TuneConfig(search_alg=searcher, num_samples=20)).fit()

    ``metric`` and ``mode`` come from here or from ``tune.TuneConfig`` (which overrides them);
    as with Ray's own searchers, :meth:`suggest` raises while either is unset. Tune passes
    ``TuneConfig``'s to a searcher only with a non-empty ``param_space``, so with an empty
    one give them here.

    The trainable reports the metric, and ``final: True`` with its last result: a trial that
    ends without it was stopped early (ASHA): only its rung rewards teach (below and
    :mod:`controller.outcome`).

    ``param_space`` holds constants the trainable reads next to the pattern: the searcher
    proposes only ``pattern`` and ``tokens`` and samples nothing else, so a search-space
    definition there (``tune.uniform(...)``, ``tune.grid_search([...])``, ...) or a
    ``pattern``/``tokens`` entry is refused with a ``ValueError`` when the Tuner starts.

    Under :class:`ray.tune.search.Repeater` the controller learns once per suggestion from
    Repeater's average over the repeats (a *group summary*, see :mod:`controller.outcome`).

    With an ASHA scheduler, give its rungs (the rung rule of :mod:`controller.outcome`)::

        scheduler = ASHAScheduler(metric="reward", mode="max", max_t=9, grace_period=1,
                                  reduction_factor=3)
        searcher = PatternSearcher(controller, "reward", "max", rungs=asha_rungs(1, 3, 9))

    ``rungs``: the values of ``time_attr`` (epochs: the trainable reports once per epoch) at
    which the controller also learns from a trial's intermediate reward, once per (trial,
    rung) and against that rung's own baseline; the reward that stops a trial there counts
    too. Empty (the default): only final rewards, as without a scheduler. A controller whose
    ``observe`` takes no ``rung`` (:class:`~controller.controllers.RandomController`) is
    given final rewards only.
    """

    def __init__(self, controller: Controller, metric: str | None = None,
                 mode: str | None = None, rungs: tuple[int, ...] = (),
                 time_attr: str = TUNE_RESULT_KEY) -> None:
        super().__init__(metric=metric, mode=mode)
        self.controller = controller
        self.live: dict[str, Suggestion] = {}
        self.outcomes: dict[str, TrialState] = {}
        self.rungs = tuple(sorted({int(rung) for rung in rungs}))
        self.time_attr = time_attr
        self.observed: dict[str, set[int]] = {}
        """The rungs each live trial was observed at (never twice: retries, resumes)."""

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec) -> bool:
        check_param_space(config)
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"PatternSearcher: mode must be 'min' or 'max', got {mode!r}")
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._metric or not self._mode:
            raise RuntimeError(UNDEFINED_METRIC_MODE.format(
                cls=type(self).__name__, metric=self._metric, mode=self._mode)
                + " (Tune passes TuneConfig's metric and mode to a searcher only when "
                "param_space is not empty.)")
        suggestion = self.controller.suggest()
        self.live[trial_id] = suggestion
        return {"pattern": suggestion.pattern.to_json(), "tokens": list(suggestion.tokens)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """An intermediate result: observed when it is at a rung (the rung rule)."""
        if not result.get("final"):
            self._observe_rung(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        suggestion = self.live.get(trial_id)
        if suggestion is None:  # already handled before a restore
            return
        outcome = self.outcome(result, error)
        if outcome is TrialState.EARLY_STOPPED:
            # Tune gives a scheduler's stopping result to on_trial_complete only
            self._observe_rung(trial_id, result)
        self.live.pop(trial_id)
        self.observed.pop(trial_id, None)
        self.outcomes[trial_id] = outcome
        if outcome is TrialState.COMPLETED:
            self.controller.observe(suggestion, self._reward(result))
        elif outcome is TrialState.FAILED and not error and result \
                and self._metric not in result:
            logger.warning("PatternSearcher: trial %s ended without the metric %r (it reported "
                           "%s); the controller does not learn from it", trial_id,
                           self._metric, ", ".join(sorted(map(str, result))) or "nothing")

    def outcome(self, result: dict | None, error: bool) -> TrialState:
        """:func:`~controller.outcome.trial_outcome` for this searcher's metric."""
        return trial_outcome(result, error, self._metric)

    def _reward(self, result: dict) -> float:
        reward = float(result[self._metric])
        return reward if self._mode == "max" else -reward

    def _observe_rung(self, trial_id: str, result: dict | None) -> None:
        """Observe ``result`` at its rung, once per (trial, rung); anything else is skipped:
        no rungs, an unknown trial, a result off the rungs, without the metric or not
        finite, a controller that cannot tell rungs apart."""
        suggestion = self.live.get(trial_id)
        if not self.rungs or suggestion is None or not result:
            return
        rung, value = result.get(self.time_attr), result.get(self._metric)
        if rung not in self.rungs or not is_real(value, finite=True) or not self._learns_from_rungs():
            return
        seen = self.observed.setdefault(trial_id, set())
        if int(rung) in seen:
            return
        seen.add(int(rung))
        self.controller.observe(suggestion, self._reward(result), rung=int(rung))

    def _learns_from_rungs(self) -> bool:
        try:
            return "rung" in inspect.signature(self.controller.observe).parameters
        except (TypeError, ValueError):
            return False

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
        # a searcher saved before rungs existed learns from final rewards only
        state = {"rungs": (), "time_attr": TUNE_RESULT_KEY, "observed": {}, **state}
        self.__dict__.update(state)
        self.controller = controller

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__getstate__(), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__setstate__(pickle.load(file))


def check_param_space(config: dict[str, Any]) -> None:
    """Refuse what a ``param_space`` may not hold next to a :class:`PatternSearcher`: search
    space definitions (Domains, grid searches), which it would pass to the trainable
    unresolved, and the ``pattern``/``tokens`` entries its suggestions overwrite."""
    taken = [key for key in PROPOSED_KEYS if key in config]
    if taken:
        raise ValueError(f"PatternSearcher: param_space[{taken[0]!r}] is set by the searcher's "
                         "suggestions; remove it from param_space")
    _, domains, grids = parse_spec_vars(config)
    if domains or grids:
        path, domain = (domains or grids)[0]
        kind = "grid_search" if not domains else type(domain).__name__
        where = "".join(f"[{part!r}]" for part in path)
        raise ValueError(
            f"PatternSearcher: param_space{where} is a search-space definition ({kind}); "
            "PatternSearcher proposes only the dropout pattern and samples nothing else: "
            "give param_space fixed values (sample other hyperparameters with another searcher)")
