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
  ``EARLY_STOPPED``: its *final* reward is for a shorter budget than the others', so it
  never enters the full-budget baseline; what the controller learns from its intermediate
  rewards is the rung rule below;
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

The rung rule (multi-fidelity search, ``autodropout search --scheduler asha``): rewards
are compared only with rewards of the same budget. A *rung* is an epoch at which ASHA
compares trials (:func:`asha_rungs`; ``--scheduler none`` has none). The controller
learns

* from a trial's reward at **each rung it reached**, once per (trial, rung), against that
  rung's own moving-average baseline, whether ASHA then continued or stopped it; and
* from a ``COMPLETED`` trial's final reward, as before, against the full-budget baseline
  (a diverged trial's reward 0 counts there, at whatever epoch it diverged).

So a trial that ASHA stops at the first rung teaches once, a trial that runs to the end
teaches once per rung plus once for its final reward, and with no rungs (``--scheduler
none``) every completed trial teaches exactly once, as before. Why this rule rather than
"only trials that reached a common rung" or "completed trials only":

* bias: each advantage ``R - b_rung`` compares rewards after the same number of epochs of
  the same learning-rate schedule, so a long budget never looks better than a short one
  merely for being long (the rewards of a synthetic task that grow with epochs never share
  a baseline: ``tests/test_asha.py``). A low rung's reward is a proxy for the full-budget
  one (it favours patterns that learn fast); it is the proxy ASHA already ranks by, and the
  trials that survive it are also judged at the higher rungs among the survivors;
* variance: every trial contributes (with ASHA most stop at the first rung, and a rule
  that kept only completed trials would throw away about ``1 - 1/reduction**rungs`` of
  them); a trial's rung rewards are correlated, which is why each (trial, rung) is
  observed at most once, retries and resumes included;
* importance weights: each observation uses the log-probabilities the suggestion was
  *sampled* with, so a suggestion observed at three rungs is three PPO-style clipped
  updates of one sample (``clip(pi_new/pi_old)`` stops pushing once the ratio leaves
  ``[1-eps, 1+eps]``), the multi-epoch reuse the clipped surrogate is designed for.

No torch and no Ray in here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from autodropout.validation import is_real
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
        return TrialState.COMPLETED if is_real(value, finite=True) else TrialState.FAILED
    if error or not result or metric not in result:
        return TrialState.FAILED
    return TrialState.COMPLETED if result.get("final") else TrialState.EARLY_STOPPED


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> tuple[int, ...]:
    """The epochs before ``max_t`` at which Ray's one-bracket ``AsyncHyperBandScheduler``
    (``time_attr="training_iteration"``, one result per epoch) compares a trial with the
    others, in order: where it records the trial's reward and may stop it.

    Ray's milestones are ``grace_period * reduction_factor**k`` for ``k`` below
    ``int(log(max_t / grace_period) / log(reduction_factor) + 1)``; a trial reaching epoch
    ``e`` is compared at the largest milestone ``<= e`` it has no record at. With a whole
    reduction factor that is every milestone; a fractional one can put two milestones in one
    epoch and defer one of them, so the epochs are found by stepping through Ray's rule.
    ``max_t`` itself is no rung: Ray stops every trial there, and its reward is the final one.
    """
    ratio = math.log(max_t / grace_period) / math.log(reduction_factor)
    milestones = [grace_period * reduction_factor ** k for k in reversed(range(int(ratio + 1)))]
    recorded: set[int] = set()
    rungs = []
    for epoch in range(1, max_t):
        for index, milestone in enumerate(milestones):
            if epoch >= milestone and index not in recorded:
                recorded.add(index)
                rungs.append(epoch)
                break
    return tuple(rungs)
