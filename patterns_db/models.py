"""The store's tables as typed SQLAlchemy 2.x ORM models.

``searches`` 1-n ``trials`` n-1 ``patterns``; ``trial_metrics`` holds every metric a trial
reported, one row per (name, step); ``pattern_tags`` are movable names for patterns;
``final_evaluations`` hold test metrics of a pattern or of a named baseline. The schema of
these models is the head revision of the Alembic migrations in ``patterns_db/migrations``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TRIAL_STATUSES = ("running", "completed", "failed", "early-stopped")
SEARCH_STATUSES = ("running", "completed", "failed", "stopped")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME_LENGTH = 200


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC ``datetime``, stored naive (in UTC) so SQLite and PostgreSQL agree."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class PatternRow(Base):
    """A distinct pattern: its canonical JSON and SHA-256 content hash (``Pattern.hash``)."""

    __tablename__ = "patterns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    canonical_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SearchRow(Base):
    """One pattern search: its space, task, controller settings/state and lifecycle."""

    __tablename__ = "searches"
    __table_args__ = (CheckConstraint(_one_of("status", SEARCH_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    space_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    space_yaml: Mapped[str] = mapped_column(Text)
    dataset: Mapped[str] = mapped_column(String(NAME_LENGTH))
    model: Mapped[str] = mapped_column(String(NAME_LENGTH))
    controller_settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    controller_state: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)


class TrialRow(Base):
    """One trial of a search: the pattern it tried, its reward, status and where it ran."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("search_id", "trial_id"),
        CheckConstraint(_one_of("status", TRIAL_STATUSES), name="status"),
        Index(None, "status", "reward", "id"),
        Index(None, "pattern_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    search_id: Mapped[int] = mapped_column(ForeignKey("searches.id"))
    trial_id: Mapped[str] = mapped_column(String(NAME_LENGTH))
    pattern_id: Mapped[int] = mapped_column(ForeignKey("patterns.id"))
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration: Mapped[float | None] = mapped_column(Float, nullable=True)
    node: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TrialMetricRow(Base):
    """One reported value: metric ``name`` of a trial at ``step`` (NULL stands for NaN)."""

    __tablename__ = "trial_metrics"

    trial_pk: Mapped[int] = mapped_column(
        ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)


class TagRow(Base):
    """A movable name pointing at a pattern, e.g. ``wrn-fashion-best``."""

    __tablename__ = "pattern_tags"
    __table_args__ = (Index(None, "pattern_id"),)

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    pattern_id: Mapped[int] = mapped_column(ForeignKey("patterns.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class FinalEvaluationRow(Base):
    """A test metric of a pattern, or of a named baseline, on a dataset/model with one seed."""

    __tablename__ = "final_evaluations"
    __table_args__ = (
        CheckConstraint("(pattern_id IS NULL) <> (baseline IS NULL)", name="subject"),
        Index(None, "pattern_id"),
        Index(None, "dataset", "model"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pattern_id: Mapped[int | None] = mapped_column(ForeignKey("patterns.id"), nullable=True)
    baseline: Mapped[str | None] = mapped_column(String(NAME_LENGTH), nullable=True)
    dataset: Mapped[str] = mapped_column(String(NAME_LENGTH))
    model: Mapped[str] = mapped_column(String(NAME_LENGTH))
    seed: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(NAME_LENGTH))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
