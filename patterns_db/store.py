"""``PatternStore``: every search, trial, found pattern, tag and final evaluation in one database.

A narrow storage interface in the manner of Optuna's storages: the search service creates and
finishes searches, records trials (an idempotent upsert, so a resumed search may report a
trial again) and saves its controller state; users and training pipelines query the best
patterns, resolve references (tag, id or hash prefix), tag, export and import.

Every write is one transaction (SQLite: ``BEGIN IMMEDIATE``), so a crash mid-write leaves
nothing behind. Upserts are ``INSERT ... ON CONFLICT`` on SQLite and PostgreSQL, the two
supported backends; any URL of theirs works (``--db``/``AUTODROPOUT_DB``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from autodropout.errors import BadInput, NotFound
from autodropout.patterns import Pattern
from autodropout.patterns.files import dump_pattern, format_of, read_pattern_file

from .engine import WRITE, create_store_engine
from .errors import StoreError
from .models import (
    NAME_LENGTH,
    SEARCH_STATUSES,
    TRIAL_STATUSES,
    FinalEvaluationRow,
    PatternRow,
    SearchRow,
    TagRow,
    TrialMetricRow,
    TrialRow,
    utcnow,
)
from .records import (
    FinalEvaluation,
    PatternRecord,
    RankedPattern,
    SearchRecord,
    SearchSummary,
    TrialRecord,
)
from .schema import ensure_schema
from .urls import redact, resolve_url, scrub, sqlite_path

log = logging.getLogger(__name__)

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
MIN_HASH_PREFIX = 4
TAG_NAME = re.compile(r"(?!\d+$)[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # all digits: an id
_HEX = re.compile(r"[0-9a-f]+")
_MAX_ID = 2**31 - 1
_INSERTS = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}


class PatternStore:
    """The pattern store at ``url`` (a SQLAlchemy URL or a SQLite file path).

    ``url=None`` means ``$AUTODROPOUT_DB``, else ``$XDG_DATA_HOME/autodropout/patterns.db``.
    Opening creates or upgrades the schema; a database from a newer autodropout is refused.
    With ``create=False`` a missing SQLite file raises :class:`NotFound` instead of being
    created. ``store.url`` is the URL with its password masked. Use it as a context manager
    or call :meth:`close`.
    """

    def __init__(self, url: str | URL | None = None, *, create: bool = True) -> None:
        self._url = resolve_url(url)
        self.url = redact(self._url)
        backend = self._url.get_backend_name()
        if backend not in SUPPORTED_BACKENDS:
            raise StoreError(
                f"{self.url}: backend {backend!r} is not supported (use sqlite or postgresql)"
            )
        path = sqlite_path(self._url)
        if not create and path is not None and not path.is_file():
            raise NotFound(f"no pattern store at {path} (pass --db/db= or set AUTODROPOUT_DB)")
        try:
            self._engine = create_store_engine(self._url)
            try:
                ensure_schema(self._engine, self.url)
            except BaseException:
                self._engine.dispose()
                raise
        except StoreError:
            raise
        except (SQLAlchemyError, ImportError, OSError) as error:
            reason = scrub(str(getattr(error, "orig", None) or error), self._url)
            raise StoreError(f"cannot open pattern store {self.url}: {reason.strip()}") from None
        self._write_engine = self._engine.execution_options(**WRITE)
        self._insert = _INSERTS[backend]
        self._search_ids: dict[str, int] = {}
        self._pattern_ids: dict[str, int] = {}
        log.debug("opened pattern store %s", self.url)

    def __repr__(self) -> str:
        return f"PatternStore({self.url!r})"

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> PatternStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with Session(self._engine) as session:
            yield session

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with Session(self._write_engine) as session, session.begin():
            yield session

    # searches -----------------------------------------------------------------------------
    def create_search(
        self,
        name: str,
        space_name: str,
        space_yaml: str,
        dataset: str,
        model: str,
        controller_settings: Mapping[str, Any] | None = None,
        *,
        resume: bool = False,
    ) -> SearchRecord:
        """Start search ``name``. An existing name is refused unless ``resume``, which sets the
        search running again (its space, dataset and model must match)."""
        values = {
            "name": _check_name(name, "name"),
            "space_name": _check_name(space_name, "space_name"),
            "space_yaml": _check_text(space_yaml, "space_yaml"),
            "dataset": _check_name(dataset, "dataset"),
            "model": _check_name(model, "model"),
            "controller_settings": _check_json(controller_settings or {}, "controller_settings"),
        }
        statement = (
            self._insert(SearchRow)
            .values(**values, status="running", started_at=utcnow(), host=socket.gethostname())
            .on_conflict_do_nothing(index_elements=["name"])
            .returning(SearchRow.id)
        )
        with self._writing() as session:
            if session.execute(statement).scalar_one_or_none() is None:
                row = session.scalars(select(SearchRow).where(SearchRow.name == name)).one()
                _check_resumable(row, values, resume)
                row.status, row.finished_at = "running", None
        return self.get_search(name)

    def get_search(self, name: str) -> SearchRecord:
        with self._reading() as session:
            return _search_record(self._search_row(session, name))

    def finish_search(self, name: str, status: str = "completed") -> SearchRecord:
        """Mark the search ``completed``, ``failed`` or ``stopped`` and stamp its end."""
        _check_choice(status, SEARCH_STATUSES[1:], "status")
        with self._writing() as session:
            row = self._search_row(session, name)
            row.status, row.finished_at = status, utcnow()
        return self.get_search(name)

    def searches(self) -> list[SearchSummary]:
        """Every search with its progress, oldest first."""
        with self._reading() as session:
            rows = session.scalars(select(SearchRow).order_by(SearchRow.id)).all()
            return [self._summary(session, row) for row in rows]

    def search_summary(self, name: str) -> SearchSummary:
        with self._reading() as session:
            return self._summary(session, self._search_row(session, name))

    def save_controller_state(self, search: str, state: bytes) -> None:
        """Keep the search controller's serialized state (for warm start and resume)."""
        if not isinstance(state, (bytes, bytearray, memoryview)):
            raise BadInput(f"state: must be bytes, got {type(state).__name__}")
        with self._writing() as session:
            self._search_row(session, search).controller_state = bytes(state)

    def load_controller_state(self, search: str) -> bytes | None:
        with self._reading() as session:
            return self._search_row(session, search).controller_state

    def _search_row(self, session: Session, name: str) -> SearchRow:
        row = session.scalars(select(SearchRow).where(SearchRow.name == name)).one_or_none()
        if row is None:
            raise NotFound(f"no search named {name!r}")
        return row

    def _search_id(self, name: str) -> int:
        if name not in self._search_ids:
            with self._reading() as session:
                self._search_ids[name] = self._search_row(session, name).id
        return self._search_ids[name]

    def _summary(self, session: Session, row: SearchRow) -> SearchSummary:
        counts = session.execute(
            select(TrialRow.status, func.count())
            .where(TrialRow.search_id == row.id)
            .group_by(TrialRow.status)
        ).all()
        best = session.execute(
            select(TrialRow.reward, TrialRow.trial_id, PatternRow.hash)
            .join(PatternRow, PatternRow.id == TrialRow.pattern_id)
            .where(_completed(), TrialRow.search_id == row.id)
            .order_by(*_BEST_FIRST)
            .limit(1)
        ).one_or_none()
        reward, trial_id, pattern_hash = best if best is not None else (None, None, None)
        return SearchSummary(_search_record(row), dict(counts), reward, trial_id, pattern_hash)

    # trials -------------------------------------------------------------------------------
    def record_trial(
        self,
        search: str,
        trial_id: str,
        pattern: Pattern | Mapping[str, Any],
        reward: float | None = None,
        metrics: Sequence[Mapping[str, float]] = (),
        status: str = "completed",
        error: str | None = None,
        duration: float | None = None,
        node: str | None = None,
    ) -> None:
        """Insert or update (same ``search`` and ``trial_id``) one trial, in one transaction.

        ``metrics`` holds one mapping per reported step, metric name -> number (``None``: not
        reported); a mapping's integral ``"step"`` entry gives its step (else its position). The call replaces the trial's
        earlier state and metrics: it reports the trial as it is now. NaN metric values are
        kept (stored as NULL); ``reward`` must be finite or ``None``.
        """
        values = {
            "trial_id": _check_name(trial_id, "trial_id"),
            "reward": _check_number(reward, "reward"),
            "status": _check_choice(status, TRIAL_STATUSES, "status"),
            "error": None if error is None else _check_text(error, "error"),
            "duration": _check_number(duration, "duration", low=0.0),
            "node": None if node is None else _check_name(node, "node"),
        }
        metric_rows = _metric_rows(metrics)
        pattern = _as_pattern(pattern)
        search_id = self._search_id(search)
        now = utcnow()
        insert = self._insert(TrialRow).values(
            **values, search_id=search_id, created_at=now, updated_at=now
        )
        changed = ("pattern_id", "reward", "status", "error", "duration", "node", "updated_at")
        upsert = insert.on_conflict_do_update(
            index_elements=["search_id", "trial_id"],
            set_={column: insert.excluded[column] for column in changed},
        ).returning(TrialRow.id)
        with self._writing() as session:
            pattern_id = self._store_pattern(session, pattern)
            trial_pk = session.execute(upsert.values(pattern_id=pattern_id)).scalar_one()
            session.execute(delete(TrialMetricRow).where(TrialMetricRow.trial_pk == trial_pk))
            if metric_rows:
                session.execute(
                    TrialMetricRow.__table__.insert(),
                    [{"trial_pk": trial_pk, **row} for row in metric_rows],
                )
        self._pattern_ids[pattern.hash] = pattern_id

    def trials(self, search: str, *, with_metrics: bool = True) -> list[TrialRecord]:
        """The search's history: its trials in the order they were first recorded."""
        with self._reading() as session:
            row = self._search_row(session, search)
            query = _trial_query().where(TrialRow.search_id == row.id).order_by(TrialRow.id)
            trials = session.execute(query).all()
            metrics = self._metrics(session, row.id) if with_metrics else {}
        return [_trial_record(trial, metrics.get(trial[0].id, ())) for trial in trials]

    def pattern_trials(self, ref: str | int) -> list[TrialRecord]:
        """The trials that tried the pattern ``ref`` (its provenance), best first."""
        with self._reading() as session:
            pattern = self._find_pattern(session, ref)
            query = (
                _trial_query()
                .where(TrialRow.pattern_id == pattern.id)
                .order_by(TrialRow.reward.desc().nulls_last(), TrialRow.id)
            )
            return [_trial_record(trial, ()) for trial in session.execute(query).all()]

    def _metrics(self, session: Session, search_id: int) -> dict[int, tuple[dict, ...]]:
        query = (
            select(TrialMetricRow)
            .join(TrialRow, TrialRow.id == TrialMetricRow.trial_pk)
            .where(TrialRow.search_id == search_id)
            .order_by(TrialMetricRow.trial_pk, TrialMetricRow.step)
        )
        steps: dict[int, dict[int, dict[str, float]]] = {}
        for metric in session.scalars(query):
            step = steps.setdefault(metric.trial_pk, {}).setdefault(metric.step, {})
            step[metric.name] = math.nan if metric.value is None else metric.value
        return {
            trial_pk: tuple({"step": step, **values} for step, values in by_step.items())
            for trial_pk, by_step in steps.items()
        }

    # patterns -----------------------------------------------------------------------------
    def add_pattern(self, pattern: Pattern | Mapping[str, Any]) -> PatternRecord:
        """Store ``pattern`` (a no-op when its hash is stored already) and return its record."""
        pattern = _as_pattern(pattern)
        with self._writing() as session:
            pattern_id = self._store_pattern(session, pattern)
        self._pattern_ids[pattern.hash] = pattern_id
        return self.resolve(pattern_id)

    def _store_pattern(self, session: Session, pattern: Pattern) -> int:
        if pattern.hash in self._pattern_ids:
            return self._pattern_ids[pattern.hash]
        statement = (
            self._insert(PatternRow)
            .values(
                hash=pattern.hash,
                kind=pattern.kind,
                canonical_json=pattern.to_json(),
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["hash"])
            .returning(PatternRow.id)
        )
        created = session.execute(statement).scalar_one_or_none()
        if created is not None:
            return created
        return session.scalars(select(PatternRow.id).where(PatternRow.hash == pattern.hash)).one()

    def resolve(self, ref: str | int) -> PatternRecord:
        """The pattern a tag, a row id or a hash prefix (at least 4 hex digits) names, in that
        order of precedence. Raises :class:`NotFound`, or :class:`BadInput` for an ambiguous
        prefix."""
        with self._reading() as session:
            return self._pattern_record(session, self._find_pattern(session, ref))

    def _find_pattern(self, session: Session, ref: str | int) -> PatternRow:
        if isinstance(ref, int) and not isinstance(ref, bool):
            ref = str(ref)
        if not isinstance(ref, str) or not ref.strip():
            raise BadInput(f"ref: must be a tag, id or hash prefix, got {ref!r}")
        ref = ref.strip()
        tag = session.get(TagRow, ref)
        if tag is not None:
            return session.get_one(PatternRow, tag.pattern_id)
        if ref.isdigit() and int(ref) <= _MAX_ID and (row := session.get(PatternRow, int(ref))):
            return row
        prefix = ref.lower()
        if len(prefix) >= MIN_HASH_PREFIX and _HEX.fullmatch(prefix):
            rows = session.scalars(
                select(PatternRow)
                .where(PatternRow.hash >= prefix, PatternRow.hash < prefix + "g")
                .order_by(PatternRow.hash)
                .limit(3)
            ).all()
            if len(rows) == 1:
                return rows[0]
            if rows:
                shown = ", ".join(row.hash[:16] for row in rows[:2])
                raise BadInput(f"hash prefix {ref!r} is ambiguous ({shown}, ...): give more digits")
        raise NotFound(f"no pattern with tag, id or hash prefix {ref!r}")

    def _pattern_record(self, session: Session, row: PatternRow) -> PatternRecord:
        return _pattern_records(session, [row])[row.id]

    def tag(self, ref: str | int, name: str) -> PatternRecord:
        """Point tag ``name`` at the pattern ``ref`` (moving it if it pointed elsewhere)."""
        if not isinstance(name, str) or not TAG_NAME.fullmatch(name):
            raise BadInput(
                f"tag name: {name!r} must be letters, digits, '.', '_' and '-' (at most 128, "
                "starting with a letter or digit) and not all digits"
            )
        with self._writing() as session:
            pattern_id = self._find_pattern(session, ref).id
            insert = self._insert(TagRow).values(
                name=name, pattern_id=pattern_id, updated_at=utcnow()
            )
            session.execute(
                insert.on_conflict_do_update(
                    index_elements=["name"],
                    set_={
                        "pattern_id": insert.excluded.pattern_id,
                        "updated_at": insert.excluded.updated_at,
                    },
                )
            )
        return self.resolve(pattern_id)

    def best(
        self,
        k: int = 10,
        *,
        kind: str | None = None,
        space: str | None = None,
        dataset: str | None = None,
        model: str | None = None,
        search: str | None = None,
        min_reward: float | None = None,
    ) -> list[RankedPattern]:
        """The ``k`` distinct patterns with the highest reward among completed trials, each with
        its best trial; filters narrow the trials considered."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise BadInput(f"k: must be a positive integer, got {k!r}")
        # Search filters become a list of search ids and the kind is checked on the candidate
        # patterns, so the trials query is a walk down ix_trials_status_reward_id whatever
        # the planner's statistics say.
        search_filters = {
            SearchRow.space_name: space,
            SearchRow.dataset: dataset,
            SearchRow.model: model,
            SearchRow.name: search,
        }
        searches_query = select(
            SearchRow.id, SearchRow.name, SearchRow.space_name, SearchRow.dataset, SearchRow.model
        ).where(*(column == value for column, value in search_filters.items() if value is not None))
        query = select(TrialRow.pattern_id, TrialRow.search_id, TrialRow.reward, TrialRow.trial_id)
        query = query.where(_completed()).order_by(*_BEST_FIRST)
        if min_reward is not None:
            query = query.where(TrialRow.reward >= _check_number(min_reward, "min_reward"))
        with self._reading() as session:
            searches = {row.id: row for row in session.execute(searches_query)}
            if any(value is not None for value in search_filters.values()):
                query = query.where(TrialRow.search_id.in_(list(searches)))
            ranked = _distinct_patterns(session, query, k, kind)
            rows = session.scalars(
                select(PatternRow).where(PatternRow.id.in_([hit[0] for hit in ranked]))
            ).all()
            records = _pattern_records(session, rows)
        return [
            RankedPattern(
                record=records[pattern_id],
                reward=reward,
                search=searches[search_id].name,
                trial_id=trial_id,
                space=searches[search_id].space_name,
                dataset=searches[search_id].dataset,
                model=searches[search_id].model,
            )
            for pattern_id, search_id, reward, trial_id in ranked
        ]

    # files --------------------------------------------------------------------------------
    def export(
        self, ref: str | int, format: str | None = None, path: str | os.PathLike[str] | None = None
    ) -> str:
        """The export text of pattern ``ref`` (JSON unless ``format`` or ``path``'s suffix says
        YAML), written atomically to ``path`` when given."""
        format = format or (format_of(path) if path is not None else "json")
        text = dump_pattern(self.resolve(ref).pattern, format)
        if path is not None:
            path = Path(path)
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_text(text, encoding="utf-8")
            temporary.replace(path)
        return text

    def import_file(self, path: str | os.PathLike[str]) -> PatternRecord:
        """Validate the pattern file at ``path`` and store it; a refused file writes nothing."""
        return self.add_pattern(read_pattern_file(path))

    # final evaluations --------------------------------------------------------------------
    def add_final_evaluation(
        self,
        dataset: str,
        model: str,
        seed: int,
        metric: str,
        value: float,
        *,
        pattern: str | int | Pattern | None = None,
        baseline: str | None = None,
    ) -> FinalEvaluation:
        """Record a test metric of ``pattern`` (a ref or a :class:`Pattern`) or of a named
        ``baseline`` (exactly one of them) for one seed. Each call adds a row."""
        if (pattern is None) == (baseline is None):
            raise BadInput("pattern, baseline: give exactly one of them")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BadInput(f"seed: must be an integer, got {seed!r}")
        row = FinalEvaluationRow(
            baseline=None if baseline is None else _check_name(baseline, "baseline"),
            dataset=_check_name(dataset, "dataset"),
            model=_check_name(model, "model"),
            seed=seed,
            metric=_check_name(metric, "metric"),
            value=_check_number(value, "value", required=True),
            created_at=utcnow(),
        )
        with self._writing() as session:
            if isinstance(pattern, Pattern):
                row.pattern_id = self._store_pattern(session, pattern)
            elif pattern is not None:
                row.pattern_id = self._find_pattern(session, pattern).id
            session.add(row)
            session.flush()
            return _evaluation(row, session)

    def final_evaluations(
        self,
        pattern: str | int | None = None,
        *,
        dataset: str | None = None,
        model: str | None = None,
        baselines_only: bool = False,
    ) -> list[FinalEvaluation]:
        """Final evaluations of ``pattern`` (else of everything), narrowed by dataset/model."""
        query = select(FinalEvaluationRow).order_by(FinalEvaluationRow.id)
        if dataset is not None:
            query = query.where(FinalEvaluationRow.dataset == dataset)
        if model is not None:
            query = query.where(FinalEvaluationRow.model == model)
        if baselines_only:
            query = query.where(FinalEvaluationRow.baseline.is_not(None))
        with self._reading() as session:
            if pattern is not None:
                pattern_id = self._find_pattern(session, pattern).id
                query = query.where(FinalEvaluationRow.pattern_id == pattern_id)
            return [_evaluation(row, session) for row in session.scalars(query)]


# helpers ----------------------------------------------------------------------------------
_BEST_FIRST = (TrialRow.reward.desc(), TrialRow.id.desc())


def _completed():
    return (TrialRow.status == "completed") & TrialRow.reward.is_not(None)


def _distinct_patterns(session: Session, query: Select, k: int, kind: str | None) -> list[tuple]:
    """The first ``k`` rows of ``query`` with distinct patterns (first column) of ``kind``,
    reading the reward-ordered trials in growing batches so the index answers without a full
    scan."""
    kinds: dict[int, str] = {}
    limit = 4 * k
    while True:
        rows = session.execute(query.limit(limit)).all()
        if kind is not None:
            unseen = {row[0] for row in rows} - kinds.keys()
            kind_query = select(PatternRow.id, PatternRow.kind).where(PatternRow.id.in_(unseen))
            kinds.update({pattern_id: found for pattern_id, found in session.execute(kind_query)})
        picked: dict[int, tuple] = {}
        for row in rows:
            if kind is None or kinds[row[0]] == kind:
                picked.setdefault(row[0], tuple(row))
            if len(picked) == k:
                return list(picked.values())
        if len(rows) < limit:
            return list(picked.values())
        limit *= 4


def _pattern_records(session: Session, rows: Sequence[PatternRow]) -> dict[int, PatternRecord]:
    """Records of pattern ``rows`` with their tags, fetched in one query."""
    tags: dict[int, list[str]] = {}
    query = (
        select(TagRow.pattern_id, TagRow.name)
        .where(TagRow.pattern_id.in_([row.id for row in rows]))
        .order_by(TagRow.name)
    )
    for pattern_id, name in session.execute(query):
        tags.setdefault(pattern_id, []).append(name)
    return {
        row.id: PatternRecord(
            row.id,
            row.hash,
            row.kind,
            Pattern.from_json(row.canonical_json, f"pattern {row.hash[:12]}"),
            row.created_at,
            tuple(tags.get(row.id, ())),
        )
        for row in rows
    }


def _trial_query() -> Select:
    return (
        select(TrialRow, SearchRow.name, PatternRow.hash)
        .join(SearchRow, SearchRow.id == TrialRow.search_id)
        .join(PatternRow, PatternRow.id == TrialRow.pattern_id)
    )


def _trial_record(row: Any, metrics: tuple[dict, ...]) -> TrialRecord:
    trial, search, pattern_hash = row
    return TrialRecord(
        search=search,
        trial_id=trial.trial_id,
        pattern_id=trial.pattern_id,
        pattern_hash=pattern_hash,
        reward=trial.reward,
        status=trial.status,
        error=trial.error,
        duration=trial.duration,
        node=trial.node,
        created_at=trial.created_at,
        updated_at=trial.updated_at,
        metrics=metrics,
    )


def _search_record(row: SearchRow) -> SearchRecord:
    return SearchRecord(
        id=row.id,
        name=row.name,
        space_name=row.space_name,
        space_yaml=row.space_yaml,
        dataset=row.dataset,
        model=row.model,
        controller_settings=dict(row.controller_settings),
        status=row.status,
        started_at=row.started_at,
        finished_at=row.finished_at,
        host=row.host,
    )


def _evaluation(row: FinalEvaluationRow, session: Session) -> FinalEvaluation:
    pattern_hash = None
    if row.pattern_id is not None:
        pattern_hash = session.get_one(PatternRow, row.pattern_id).hash
    return FinalEvaluation(
        dataset=row.dataset,
        model=row.model,
        seed=row.seed,
        metric=row.metric,
        value=row.value,
        pattern_hash=pattern_hash,
        baseline=row.baseline,
        created_at=row.created_at,
    )


def _check_resumable(row: SearchRow, values: dict[str, Any], resume: bool) -> None:
    if not resume:
        raise BadInput(f"search {row.name!r} already exists (resume it, or pick another name)")
    for field in ("space_name", "dataset", "model"):
        if getattr(row, field) != values[field]:
            raise BadInput(
                f"{field}: search {row.name!r} has {getattr(row, field)!r}, not {values[field]!r}"
            )


def _as_pattern(pattern: Pattern | Mapping[str, Any]) -> Pattern:
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, Mapping):
        return Pattern.from_dict(dict(pattern), "pattern")
    raise BadInput(f"pattern: must be a Pattern or a mapping, got {type(pattern).__name__}")


def _metric_rows(metrics: Sequence[Mapping[str, float]]) -> list[dict[str, Any]]:
    if isinstance(metrics, (str, bytes, Mapping)) or not isinstance(metrics, Iterable):
        raise BadInput("metrics: must be a list of per-step mappings of metric name -> number")
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for position, report in enumerate(metrics):
        where = f"metrics[{position}]"
        if not isinstance(report, Mapping):
            raise BadInput(f"{where}: must be a mapping of metric name -> number")
        step = report.get("step", position)
        if isinstance(step, bool) or not isinstance(step, Real) or step < 0 or step != int(step):
            raise BadInput(f"{where}.step: must be a non-negative integer, got {step!r}")
        step = int(step)
        if step in seen:
            raise BadInput(f"{where}.step: step {step} reported twice")
        seen.add(step)
        for name, value in report.items():
            if name == "step" or value is None:  # None: not reported at this step
                continue
            _check_name(name, f"{where} metric name")
            if isinstance(value, bool) or not isinstance(value, Real):
                raise BadInput(f"{where}.{name}: must be a number, got {value!r}")
            value = float(value)
            rows.append({"name": name, "step": step, "value": None if math.isnan(value) else value})
    return rows


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > NAME_LENGTH:
        raise BadInput(
            f"{what}: must be a non-empty string of at most {NAME_LENGTH} characters, got {value!r}"
        )
    return value


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadInput(f"{what}: must be a string, got {type(value).__name__}")
    return value


def _check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise BadInput(f"{what}: must be one of {', '.join(choices)}; got {value!r}")
    return value


def _check_number(
    value: Any, what: str, *, low: float | None = None, required: bool = False
) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise BadInput(f"{what}: must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise BadInput(f"{what}: must be >= {low:g}, got {value!r}")
    return float(value)


def _check_json(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise BadInput(f"{what}: must be a mapping, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise BadInput(f"{what}: must hold only JSON values ({error})") from None
