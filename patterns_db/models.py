"""The store's tables as typed SQLAlchemy 2.x ORM models, with the queries about each table.

``searches`` 1-n ``trials`` n-1 ``patterns``; ``trial_metrics`` holds every metric a trial
reported, one row per (name, step); ``pattern_tags`` are movable names for patterns;
``final_evaluations`` hold test metrics of a pattern or of a named baseline. The schema of
these models is the head revision of the Alembic migrations in ``patterns_db/migrations``.

As in Optuna's ``storages/_rdb/models.py``, a query about one table is a classmethod of its
model taking the caller's session (``SearchRow.find_by_name(session, name)``); transactions,
caches and argument checks belong to :class:`~patterns_db.store.PatternStore`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Insert,
    Integer,
    LargeBinary,
    MetaData,
    Select,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    delete,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from autodropout.errors import BadInput, NotFound
from autodropout.patterns import Pattern

from .states import SearchState, TrialState

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME_LENGTH = 200
TAG_LENGTH = 128
MIN_HASH_PREFIX = 4
_HEX = re.compile(r"[0-9a-f]+")
_MAX_ID = 2**31 - 1
_INSERTS = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}


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


class StateColumn(TypeDecorator):
    """A ``status`` column: the state's text (``VARCHAR(16)``) in the database, the
    :class:`~patterns_db.states.TrialState` or ``SearchState`` member in Python."""

    impl = String(16)
    cache_ok = True

    def __init__(self, states: type[TrialState] | type[SearchState]) -> None:
        super().__init__()
        self.states = states

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else self.states(value).value

    def process_result_value(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else self.states(value)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def insert(session: Session, model: type[Base]) -> Insert:
    """An ``INSERT`` into ``model``'s table with the ``ON CONFLICT`` clauses of the session's
    dialect (SQLite or PostgreSQL)."""
    return _INSERTS[session.get_bind().dialect.name](model)


def _status_in(states: type[TrialState] | type[SearchState]) -> CheckConstraint:
    values = ", ".join(repr(value) for value in states.values())
    return CheckConstraint(f"status IN ({values})", name="status")


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

    @property
    def pattern(self) -> Pattern:
        return Pattern.from_json(self.canonical_json, f"pattern {self.hash[:12]}")

    @classmethod
    def add(cls, session: Session, pattern: Pattern) -> int:
        """The id of ``pattern``'s row, inserted unless its hash is stored already."""
        statement = (
            insert(session, cls)
            .values(
                hash=pattern.hash,
                kind=pattern.kind,
                canonical_json=pattern.to_json(),
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["hash"])
            .returning(cls.id)
        )
        created = session.execute(statement).scalar_one_or_none()
        if created is not None:
            return created
        return session.scalars(select(cls.id).where(cls.hash == pattern.hash)).one()

    @classmethod
    def find_by_ref(cls, session: Session, ref: str | int) -> PatternRow:
        """The pattern a tag, a row id or a hash prefix names, in that order of precedence."""
        if isinstance(ref, int) and not isinstance(ref, bool):
            ref = str(ref)
        if not isinstance(ref, str) or not ref.strip():
            raise BadInput(f"ref must be a tag, id or hash prefix, got {ref!r}")
        ref = ref.strip()
        tag = session.get(TagRow, ref)
        if tag is not None:
            return session.get_one(cls, tag.pattern_id)
        if ref.isdigit() and int(ref) <= _MAX_ID and (row := session.get(cls, int(ref))):
            return row
        prefix = ref.lower()
        if len(prefix) >= MIN_HASH_PREFIX and _HEX.fullmatch(prefix):
            rows = session.scalars(
                select(cls)
                .where(cls.hash >= prefix, cls.hash < prefix + "g")
                .order_by(cls.hash)
                .limit(3)
            ).all()
            if len(rows) == 1:
                return rows[0]
            if rows:
                shown = ", ".join(row.hash[:16] for row in rows[:2])
                raise BadInput(f"hash prefix {ref!r} is ambiguous ({shown}, ...): give more digits")
        raise NotFound(f"no pattern with tag, id or hash prefix {ref!r}")

    @classmethod
    def by_ids(cls, session: Session, ids: Sequence[int]) -> Sequence[PatternRow]:
        return session.scalars(select(cls).where(cls.id.in_(ids))).all()

    @classmethod
    def kinds(cls, session: Session, ids: set[int]) -> dict[int, str]:
        return dict(session.execute(select(cls.id, cls.kind).where(cls.id.in_(ids))).all())

    @classmethod
    def untried(cls, session: Session, k: int, kind: str | None = None) -> Sequence[PatternRow]:
        """The ``k`` newest patterns (of ``kind``) with no completed trial: imported ones, and
        those whose every trial failed or was stopped early."""
        tried = select(TrialRow.id).where(TrialRow.pattern_id == cls.id, TrialRow.completed())
        query = select(cls).where(~tried.exists())
        if kind is not None:
            query = query.where(cls.kind == kind)
        return session.scalars(query.order_by(cls.created_at.desc(), cls.id.desc()).limit(k)).all()


class SearchRow(Base):
    """One pattern search: its space, task, controller settings/state and lifecycle."""

    __tablename__ = "searches"
    __table_args__ = (_status_in(SearchState),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    space_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    space_yaml: Mapped[str] = mapped_column(Text)
    dataset: Mapped[str] = mapped_column(String(NAME_LENGTH))
    model: Mapped[str] = mapped_column(String(NAME_LENGTH))
    controller_settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    controller_state: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    status: Mapped[SearchState] = mapped_column(StateColumn(SearchState))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    TASK = ("space_name", "dataset", "model")
    """The columns a resumed search must match."""

    @classmethod
    def find_by_name(cls, session: Session, name: str) -> SearchRow:
        row = session.scalars(select(cls).where(cls.name == name)).one_or_none()
        if row is None:
            raise NotFound(f"no search named {name!r}")
        return row

    @classmethod
    def tasks(cls, session: Session, **filters: str) -> dict[int, Any]:
        """id -> ``(id, name, space_name, dataset, model)`` of each search whose columns equal
        ``filters`` (without reading its space, settings or controller state)."""
        query = select(cls.id, cls.name, cls.space_name, cls.dataset, cls.model).where(
            *(getattr(cls, column) == value for column, value in filters.items())
        )
        return {row.id: row for row in session.execute(query)}

    @classmethod
    def add(cls, session: Session, **values: Any) -> bool:
        """Insert a running search unless its name exists; whether it was inserted."""
        statement = (
            insert(session, cls)
            .values(**values, status=SearchState.RUNNING, started_at=utcnow())
            .on_conflict_do_nothing(index_elements=["name"])
            .returning(cls.id)
        )
        return session.execute(statement).scalar_one_or_none() is not None

    def resume(self, task: Mapping[str, Any]) -> None:
        """Set the search running again; ``task`` must match its ``TASK`` columns."""
        for column in self.TASK:
            if getattr(self, column) != task[column]:
                raise BadInput(
                    f"{column}: search {self.name!r} has {getattr(self, column)!r}, "
                    f"not {task[column]!r}"
                )
        self.set_state(SearchState.RUNNING)

    def set_state(self, state: SearchState, error: str | None = None) -> None:
        """Enter ``state``: a finished state stamps the end, ``RUNNING`` clears it; ``error``
        (why a search failed) is kept, and cleared by any other state."""
        self.status = state
        self.finished_at = utcnow() if state.is_finished() else None
        self.error = error


class TrialRow(Base):
    """One trial of a search: the pattern it tried, its reward, status and where it ran."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("search_id", "trial_id"),
        _status_in(TrialState),
        Index(None, "status", "reward", "id"),
        Index(None, "pattern_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    search_id: Mapped[int] = mapped_column(ForeignKey("searches.id"))
    trial_id: Mapped[str] = mapped_column(String(NAME_LENGTH))
    pattern_id: Mapped[int] = mapped_column(ForeignKey("patterns.id"))
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[TrialState] = mapped_column(StateColumn(TrialState))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration: Mapped[float | None] = mapped_column(Float, nullable=True)
    node: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    REPORTED = ("pattern_id", "reward", "status", "error", "duration", "node", "updated_at")
    """The columns a later report of the same trial replaces."""

    @classmethod
    def upsert(cls, session: Session, **values: Any) -> int:
        """Insert the trial, or update the ``REPORTED`` columns of the one with the same
        ``search_id`` and ``trial_id``; its row id."""
        now = utcnow()
        statement = insert(session, cls).values(**values, created_at=now, updated_at=now)
        statement = statement.on_conflict_do_update(
            index_elements=["search_id", "trial_id"],
            set_={column: statement.excluded[column] for column in cls.REPORTED},
        )
        return session.execute(statement.returning(cls.id)).scalar_one()

    @classmethod
    def completed(cls) -> ColumnElement[bool]:
        """The trials that rank: completed, with a reward."""
        return (cls.status == TrialState.COMPLETED) & cls.reward.is_not(None)

    @classmethod
    def best_first(cls) -> tuple[ColumnElement, ...]:
        return cls.reward.desc(), cls.id.desc()

    @classmethod
    def with_refs(cls) -> Select:
        """Trials with the name of their search and the hash of their pattern."""
        return (
            select(cls, SearchRow.name, PatternRow.hash)
            .join(SearchRow, SearchRow.id == cls.search_id)
            .join(PatternRow, PatternRow.id == cls.pattern_id)
        )

    @classmethod
    def counts_by_status(cls, session: Session, search_id: int) -> dict[TrialState, int]:
        query = (
            select(cls.status, func.count()).where(cls.search_id == search_id).group_by(cls.status)
        )
        return dict(session.execute(query).all())

    @classmethod
    def best_of_search(cls, session: Session, search_id: int) -> tuple[Any, ...]:
        """``(reward, trial_id, pattern hash)`` of the search's best trial, else ``None``s."""
        query = (
            select(cls.reward, cls.trial_id, PatternRow.hash)
            .join(PatternRow, PatternRow.id == cls.pattern_id)
            .where(cls.completed(), cls.search_id == search_id)
            .order_by(*cls.best_first())
            .limit(1)
        )
        best = session.execute(query).one_or_none()
        return tuple(best) if best is not None else (None, None, None)

    @classmethod
    def best_per_pattern(
        cls,
        session: Session,
        k: int,
        *,
        kind: str | None = None,
        search_ids: Sequence[int] | None = None,
        min_reward: float | None = None,
    ) -> list[tuple[int, int, float, str]]:
        """``(pattern_id, search_id, reward, trial_id)`` of the best trial of each of the ``k``
        best distinct patterns (of ``kind``), among completed trials of ``search_ids``.

        Search filters come as a list of ids and the kind is checked on the candidate
        patterns, so the trials query is a walk down ix_trials_status_reward_id whatever the
        planner's statistics say; it reads the ranked trials in growing batches.
        """
        query = select(cls.pattern_id, cls.search_id, cls.reward, cls.trial_id)
        query = query.where(cls.completed()).order_by(*cls.best_first())
        if min_reward is not None:
            query = query.where(cls.reward >= min_reward)
        if search_ids is not None:
            query = query.where(cls.search_id.in_(search_ids))
        kinds: dict[int, str] = {}
        limit = 4 * k
        while True:
            rows = session.execute(query.limit(limit)).all()
            if kind is not None:
                kinds.update(PatternRow.kinds(session, {row[0] for row in rows} - kinds.keys()))
            picked: dict[int, tuple[int, int, float, str]] = {}
            for row in rows:
                if kind is None or kinds[row[0]] == kind:
                    picked.setdefault(row[0], tuple(row))
                if len(picked) == k:
                    return list(picked.values())
            if len(rows) < limit:
                return list(picked.values())
            limit *= 4


class TrialMetricRow(Base):
    """One reported value: metric ``name`` of a trial at ``step`` (NULL stands for NaN)."""

    __tablename__ = "trial_metrics"

    trial_pk: Mapped[int] = mapped_column(
        ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)

    @classmethod
    def replace(
        cls, session: Session, trial_pk: int, steps: Sequence[tuple[int, dict[str, float]]]
    ) -> None:
        """Make ``steps``, ``(step, {name: value})`` pairs, the trial's only metrics."""
        session.execute(delete(cls).where(cls.trial_pk == trial_pk))
        rows = [
            {
                "trial_pk": trial_pk,
                "name": name,
                "step": step,
                "value": None if math.isnan(value) else value,
            }
            for step, values in steps
            for name, value in values.items()
        ]
        if rows:
            session.execute(cls.__table__.insert(), rows)

    @classmethod
    def reports_by_trial(cls, session: Session, search_id: int) -> dict[int, tuple[dict, ...]]:
        """Each trial's metrics as per-step mappings ``{"step": s, name: value}``, by row id."""
        query = (
            select(cls)
            .join(TrialRow, TrialRow.id == cls.trial_pk)
            .where(TrialRow.search_id == search_id)
            .order_by(cls.trial_pk, cls.step)
        )
        steps: dict[int, dict[int, dict[str, float]]] = {}
        for metric in session.scalars(query):
            step = steps.setdefault(metric.trial_pk, {}).setdefault(metric.step, {})
            step[metric.name] = math.nan if metric.value is None else metric.value
        return {
            trial_pk: tuple({"step": step, **values} for step, values in by_step.items())
            for trial_pk, by_step in steps.items()
        }


class TagRow(Base):
    """A movable name pointing at a pattern, e.g. ``wrn-fashion-best``."""

    __tablename__ = "pattern_tags"
    __table_args__ = (Index(None, "pattern_id"),)

    name: Mapped[str] = mapped_column(String(TAG_LENGTH), primary_key=True)
    pattern_id: Mapped[int] = mapped_column(ForeignKey("patterns.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    @classmethod
    def point(cls, session: Session, name: str, pattern_id: int) -> None:
        """Point tag ``name`` at ``pattern_id``, creating or moving it."""
        statement = insert(session, cls).values(
            name=name, pattern_id=pattern_id, updated_at=utcnow()
        )
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["name"],
                set_={
                    "pattern_id": statement.excluded.pattern_id,
                    "updated_at": statement.excluded.updated_at,
                },
            )
        )

    @classmethod
    def names_by_pattern(cls, session: Session, pattern_ids: Sequence[int]) -> dict[int, tuple]:
        """The sorted tag names of each of ``pattern_ids`` (absent: no tags), in one query."""
        query = select(cls.pattern_id, cls.name).where(cls.pattern_id.in_(pattern_ids))
        names: dict[int, tuple[str, ...]] = {}
        for pattern_id, name in session.execute(query.order_by(cls.name)):
            names[pattern_id] = (*names.get(pattern_id, ()), name)
        return names


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

    @classmethod
    def with_hash(
        cls,
        *,
        pattern_id: int | None = None,
        dataset: str | None = None,
        model: str | None = None,
        baselines_only: bool = False,
    ) -> Select:
        """Evaluations with their pattern's hash (``None`` for baselines), oldest first,
        narrowed by each filter given."""
        filters = {cls.pattern_id: pattern_id, cls.dataset: dataset, cls.model: model}
        query = (
            select(cls, PatternRow.hash)
            .outerjoin(PatternRow, PatternRow.id == cls.pattern_id)
            .where(*(column == value for column, value in filters.items() if value is not None))
            .order_by(cls.id)
        )
        return query.where(cls.baseline.is_not(None)) if baselines_only else query
