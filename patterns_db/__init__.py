"""The pattern store: SQLAlchemy models, Alembic migrations and the ``PatternStore`` API
holding every search, trial, found pattern, tag and final evaluation."""

from .errors import StoreError
from .records import (
    FinalEvaluation,
    PatternRecord,
    RankedPattern,
    SearchRecord,
    SearchSummary,
    TrialRecord,
)
from .store import PatternStore

__all__ = [
    "FinalEvaluation",
    "PatternRecord",
    "PatternStore",
    "RankedPattern",
    "SearchRecord",
    "SearchSummary",
    "StoreError",
    "TrialRecord",
]
