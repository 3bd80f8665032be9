"""The lifecycle states of trials and searches, as stored in the ``status`` columns.

Like Optuna's ``TrialState``: one enum per kind of row, used by the schema's check
constraints, the store's queries and everything above it, so no state is a bare string.
Members are ``str`` subclasses whose value is the stored text (``TrialState.COMPLETED ==
"completed"``), so rows, JSON output and CLI filters read the same as before.
"""

from __future__ import annotations

from enum import Enum


class _State(str, Enum):
    def __str__(self) -> str:
        return self.value

    def is_finished(self) -> bool:
        """Every state but ``running`` is an end state."""
        return self.value != "running"

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class TrialState(_State):
    """A trial: ``RUNNING`` while it reports; it ends ``COMPLETED`` (its final epoch, reward
    used by the controller), ``EARLY_STOPPED`` (a scheduler stopped it; only its rung rewards
    teach the controller, see :mod:`controller.outcome`) or ``FAILED`` (an error after its retries; no reward)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    EARLY_STOPPED = "early-stopped"


class SearchState(_State):
    """A search: ``RUNNING`` until the driver ends it ``COMPLETED`` (every trial finished),
    ``STOPPED`` (interrupted; ``--resume`` continues it) or ``FAILED``."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
