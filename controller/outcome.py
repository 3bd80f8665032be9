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
  of the policy update.

No torch and no Ray in here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from patterns_db.states import TrialState


def trial_outcome(result: Mapping[str, Any] | None, error: bool = False,
                  metric: str = "reward") -> TrialState:
    """How a trial that ended with last result ``result`` (and ``error``) counts; see the
    module docstring."""
    if error or not result or metric not in result:
        return TrialState.FAILED
    return TrialState.COMPLETED if result.get("final") else TrialState.EARLY_STOPPED
