"""The one rule that decides how a trial ended, from its last Tune result.

The searcher (whether the controller learns from the trial) and the store callback (the
trial's stored status) both ask :func:`trial_outcome`, so they cannot disagree. Rules
(documented in the README):

* a trial whose last result has ``final: True`` and holds ``metric`` is ``COMPLETED``: its
  reward is ``result[metric]`` (negated for ``mode="min"``) and it updates the controller;
* a trial that failed after its retries arrives with ``error=True`` (or without a result,
  or with no ``metric`` in it) and is ``FAILED``: it is not the pattern's fault as far as we
  can tell (a lost node, a killed worker), so it is left out of the policy update. A pattern
  that makes training diverge is reported by the trainable as a *completed* trial with
  reward 0 (``diverged: True``) and does update the policy;
* a trial stopped early by a scheduler (ASHA) ends without ``final: True`` and is
  ``EARLY_STOPPED``: its reward is for a shorter budget than the others', so it is left out
  of the policy update;
* a *group summary* is ``COMPLETED`` when its ``metric`` is a finite number, else
  ``FAILED``. A summary is a result with neither ``training_iteration`` (Tune puts it in
  every result a trial reports, early-stopped or not) nor ``final``: it comes from a searcher
  that wraps this one and runs several trials per suggestion. Ray's
  :class:`~ray.tune.search.Repeater` passes ``{metric: mean over the repeats}`` once every
  repeat of a suggestion ended (it averages with ``nanmean``: a repeat that failed or
  reported no ``metric`` is left out; NaN means no repeat reported it). ``error`` there is
  the last repeat's alone, already left out of the mean, so it does not decide. Repeater
  cannot tell early-stopped repeats apart (Ray advises against early-stopping schedulers
  under it), so under Repeater every finite average counts.

No torch and no Ray in here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from patterns_db.states import TrialState

TUNE_RESULT_KEY = "training_iteration"
"""A key Tune puts in every result a trial reports (and a wrapper's summary lacks)."""


def is_group_summary(result: Mapping[str, Any] | None) -> bool:
    """Whether ``result`` is a wrapping searcher's summary of a group of trials (e.g.
    Repeater's ``{metric: mean}``), not a trial's own last result; see the module docstring."""
    return bool(result) and TUNE_RESULT_KEY not in result and "final" not in result


def trial_outcome(result: Mapping[str, Any] | None, error: bool = False,
                  metric: str = "reward") -> TrialState:
    """How a trial that ended with last result ``result`` (and ``error``) counts; see the
    module docstring."""
    if is_group_summary(result):
        value = result.get(metric)
        finite = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
        return TrialState.COMPLETED if finite else TrialState.FAILED
    if error or not result or metric not in result:
        return TrialState.FAILED
    return TrialState.COMPLETED if result.get("final") else TrialState.EARLY_STOPPED
