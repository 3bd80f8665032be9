"""What the store hands out: frozen snapshots of rows, detached from any database session.

Every record is built by :func:`from_row`, so a record field and the column of the same name
are one thing; this module imports no SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from typing import Any, TypeVar

from autodropout.patterns import Pattern

from .states import SearchState, TrialState

R = TypeVar("R")


def from_row(record_type: type[R], row: Any, /, **extra: Any) -> R:
    """A ``record_type`` dataclass whose fields are ``extra``'s entries, else ``row``'s
    attributes of the same names (a field with a default may be neither)."""
    values = {}
    for item in fields(record_type):
        if item.name in extra:
            values[item.name] = extra[item.name]
        elif item.default is MISSING or hasattr(row, item.name):
            values[item.name] = getattr(row, item.name)
    return record_type(**values)


@dataclass(frozen=True)
class SearchRecord:
    """A search: its space (name and full YAML), task, controller settings and lifecycle."""

    id: int
    name: str
    space_name: str
    space_yaml: str
    dataset: str
    model: str
    controller_settings: dict[str, Any]
    status: SearchState
    started_at: datetime
    finished_at: datetime | None
    host: str | None
    error: str | None = None
    """Why a ``FAILED`` search failed (its first trial error), else ``None``."""


@dataclass(frozen=True)
class SearchSummary:
    """A search with its progress: trials per status and the best completed trial."""

    search: SearchRecord
    trial_counts: dict[TrialState, int]
    best_reward: float | None
    best_trial_id: str | None
    best_pattern_hash: str | None

    @property
    def trials(self) -> int:
        return sum(self.trial_counts.values())


@dataclass(frozen=True)
class TrialRecord:
    """A trial. ``metrics`` holds one mapping per reported step: ``{"step": s, name: value}``."""

    search: str
    trial_id: str
    pattern_id: int
    pattern_hash: str
    reward: float | None
    status: TrialState
    error: str | None
    duration: float | None
    node: str | None
    created_at: datetime
    updated_at: datetime
    metrics: tuple[dict[str, float], ...] = ()


@dataclass(frozen=True)
class PatternRecord:
    """A stored pattern: its row id, content hash, the :class:`Pattern` and its tags."""

    id: int
    hash: str
    kind: str
    pattern: Pattern
    created_at: datetime
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RankedPattern:
    """A pattern with its best completed trial: the answer of ``PatternStore.best``."""

    record: PatternRecord
    reward: float
    search: str
    trial_id: str
    space: str
    dataset: str
    model: str


@dataclass(frozen=True)
class FinalEvaluation:
    """A test metric of a pattern (``pattern_hash``) or a named ``baseline``, for one seed."""

    dataset: str
    model: str
    seed: int
    metric: str
    value: float
    pattern_hash: str | None = None
    baseline: str | None = None
    created_at: datetime | None = field(default=None, compare=False)
