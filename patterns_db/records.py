"""What the store hands out: frozen snapshots of rows, detached from any database session."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from autodropout.patterns import Pattern


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
    status: str
    started_at: datetime
    finished_at: datetime | None
    host: str | None


@dataclass(frozen=True)
class SearchSummary:
    """A search with its progress: trials per status and the best completed trial."""

    search: SearchRecord
    trial_counts: dict[str, int]
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
    status: str
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
