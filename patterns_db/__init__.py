"""The pattern store: SQLAlchemy models, Alembic migrations and the ``PatternStore`` API
holding every search, trial, found pattern, tag and final evaluation.

Names are imported on first use (PEP 562): ``patterns_db.states`` and the record types load
no SQLAlchemy, ``PatternStore`` does. Nothing here imports torch or Ray.
"""

from autodropout._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("FinalEvaluation", "PatternRecord", "RankedPattern", "SearchRecord",
                     "SearchSummary", "TrialRecord"), ".records"),
    "PatternStore": ".store",
    "StoreError": ".errors",
    "SearchState": ".states",
    "TrialState": ".states",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
