"""``PatternStore``: every search, trial, found pattern, tag and final evaluation in one database.

The storage operations and their argument checks; the tables and the queries about each
table are in :mod:`patterns_db.models`, the records handed out in :mod:`patterns_db.records`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from autodropout.atomic import write_text_atomic
from autodropout.errors import BadInput, NotFound
from autodropout.patterns import Pattern
from autodropout.patterns.files import dump_pattern, format_of, read_pattern_file
from autodropout.validation import check_choice, check_int, check_real

from .engine import WRITE, create_store_engine
from .errors import StoreError
from .models import (
    NAME_LENGTH,
    TAG_LENGTH,
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
    from_row,
)
from .schema import ensure_schema
from .states import SearchState, TrialState
from .urls import redact, resolve_url, scrub, sqlite_path

log = logging.getLogger(__name__)

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
MAX_ERROR = 2000
"""Characters of a failed search's error that the store keeps."""
TAG_NAME = re.compile(rf"(?!\d+$)[A-Za-z0-9][A-Za-z0-9._-]{{0,{TAG_LENGTH - 1}}}")  # digits: an id


class PatternStore:
    """The pattern store at ``url`` (a SQLAlchemy URL or a SQLite file path).

    A narrow storage interface in the manner of Optuna's ``BaseStorage``: the search service
    creates and finishes searches, records trials and saves its controller state; users and
    training pipelines query the best patterns, resolve references, tag, export and import.

    Opening: ``url=None`` means ``$AUTODROPOUT_DB``, else
    ``$XDG_DATA_HOME/autodropout/patterns.db``; SQLite and PostgreSQL are supported. Opening
    creates or upgrades the schema; a database from a newer autodropout, or one that is not
    a pattern store, raises :class:`~patterns_db.errors.StoreError`, whose message (like
    ``store.url``) never holds the URL's password. With ``create=False`` a missing SQLite file
    raises :class:`NotFound` instead of being created. Use it as a context manager or call
    :meth:`close`.

    The contract of every method:

    * Each write is one transaction (SQLite: ``BEGIN IMMEDIATE``, waiting for the lock):
      it happens whole or not at all, also when the process dies mid-write, and any number of
      processes may write to one store at once. Upserts are ``INSERT ... ON CONFLICT``.
    * Records (:mod:`patterns_db.records`) are frozen snapshots, detached from the database.
      Every ``status`` is a :class:`~patterns_db.states.TrialState` or
      :class:`~patterns_db.states.SearchState` (a ``str``: ``status == "completed"`` holds).
    * A malformed argument raises :class:`~autodropout.errors.BadInput` naming it (``"NAME
      must be WHAT, got VALUE"``) before anything is written; a search, pattern or tag that
      does not exist raises :class:`~autodropout.errors.NotFound`.
    * A search is named by its unique ``name``. A pattern is named by a *ref*: a tag, a row
      id or a hash prefix of at least 4 hex digits, in that order of precedence (an
      ambiguous prefix is ``BadInput``). Storing a pattern is idempotent: its content hash
      is its identity.
    * ``record_trial`` is an idempotent upsert keyed by (search, trial id): a resumed search
      may report a trial again, and each call replaces the trial's state and metrics.
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
        with self._writing() as session:
            if not SearchRow.add(session, **values, host=socket.gethostname()):
                row = SearchRow.find_by_name(session, name)
                if not resume:
                    raise BadInput(
                        f"search {name!r} already exists (resume it, or pick another name)"
                    )
                row.resume(values)
        return self.get_search(name)

    def get_search(self, name: str) -> SearchRecord:
        with self._reading() as session:
            return _search_record(SearchRow.find_by_name(session, name))

    def finish_search(
        self, name: str, status: SearchState | str = SearchState.COMPLETED,
        error: str | None = None,
    ) -> SearchRecord:
        """End the search ``COMPLETED``, ``FAILED`` or ``STOPPED`` and stamp its end; a
        ``FAILED`` search keeps ``error`` (why it failed, at most 2,000 characters)."""
        finished = [state for state in SearchState if state.is_finished()]
        state = _check_state(status, finished, "status")
        if error is not None:
            if state is not SearchState.FAILED:
                raise BadInput(f"error is for a failed search, not a {state} one")
            error = _check_text(error, "error")[:MAX_ERROR]
        with self._writing() as session:
            SearchRow.find_by_name(session, name).set_state(state, error)
        return self.get_search(name)

    def searches(self) -> list[SearchSummary]:
        """Every search with its progress, oldest first."""
        with self._reading() as session:
            rows = session.scalars(select(SearchRow).order_by(SearchRow.id)).all()
            return [_summary(session, row) for row in rows]

    def search_summary(self, name: str) -> SearchSummary:
        with self._reading() as session:
            return _summary(session, SearchRow.find_by_name(session, name))

    def save_controller_state(self, search: str, state: bytes) -> None:
        """Keep the search controller's serialized state (for warm start and resume)."""
        if not isinstance(state, (bytes, bytearray, memoryview)):
            raise BadInput(f"state must be bytes, got {type(state).__name__}")
        with self._writing() as session:
            SearchRow.find_by_name(session, search).controller_state = bytes(state)

    def load_controller_state(self, search: str) -> bytes | None:
        with self._reading() as session:
            return SearchRow.find_by_name(session, search).controller_state

    def _search_id(self, name: str) -> int:
        if name not in self._search_ids:
            with self._reading() as session:
                self._search_ids[name] = SearchRow.find_by_name(session, name).id
        return self._search_ids[name]

    # trials -------------------------------------------------------------------------------
    def record_trial(
        self,
        search: str,
        trial_id: str,
        pattern: Pattern | Mapping[str, Any],
        reward: float | None = None,
        metrics: Sequence[Mapping[str, float]] = (),
        status: TrialState | str = TrialState.COMPLETED,
        error: str | None = None,
        duration: float | None = None,
        node: str | None = None,
    ) -> None:
        """Insert or update (same ``search`` and ``trial_id``) one trial as it is now.

        ``metrics`` holds one mapping per reported step, metric name -> number (``None``: not
        reported); a mapping's integral ``"step"`` entry gives its step (else its position).
        NaN metric values are kept (stored as NULL); ``reward`` must be finite or ``None``.
        """
        values = {
            "trial_id": _check_name(trial_id, "trial_id"),
            "reward": _check_real(reward, "reward"),
            "status": _check_state(status, TrialState, "status"),
            "error": None if error is None else _check_text(error, "error"),
            "duration": _check_real(duration, "duration", low=0.0),
            "node": None if node is None else _check_name(node, "node"),
        }
        steps = _metric_steps(metrics)
        pattern = _as_pattern(pattern)
        search_id = self._search_id(search)
        with self._writing() as session:
            pattern_id = self._add_pattern(session, pattern)
            trial_pk = TrialRow.upsert(
                session, **values, search_id=search_id, pattern_id=pattern_id
            )
            TrialMetricRow.replace(session, trial_pk, steps)
        self._pattern_ids[pattern.hash] = pattern_id

    def trials(self, search: str, *, with_metrics: bool = True) -> list[TrialRecord]:
        """The search's history: its trials in the order they were first recorded."""
        with self._reading() as session:
            search_id = SearchRow.find_by_name(session, search).id
            query = TrialRow.with_refs().where(TrialRow.search_id == search_id)
            rows = session.execute(query.order_by(TrialRow.id)).all()
            metrics = TrialMetricRow.reports_by_trial(session, search_id) if with_metrics else {}
        return [_trial_record(row, metrics.get(row[0].id, ())) for row in rows]

    def pattern_trials(self, ref: str | int) -> list[TrialRecord]:
        """The trials that tried the pattern ``ref`` (its provenance), best first."""
        with self._reading() as session:
            query = (
                TrialRow.with_refs()
                .where(TrialRow.pattern_id == PatternRow.find_by_ref(session, ref).id)
                .order_by(TrialRow.reward.desc().nulls_last(), TrialRow.id)
            )
            return [_trial_record(row) for row in session.execute(query)]

    # patterns -----------------------------------------------------------------------------
    def add_pattern(self, pattern: Pattern | Mapping[str, Any]) -> PatternRecord:
        """Store ``pattern`` (a no-op when its hash is stored already) and return its record."""
        pattern = _as_pattern(pattern)
        with self._writing() as session:
            pattern_id = self._add_pattern(session, pattern)
        self._pattern_ids[pattern.hash] = pattern_id
        return self.resolve(pattern_id)

    def _add_pattern(self, session: Session, pattern: Pattern) -> int:
        if pattern.hash in self._pattern_ids:  # filled after commits: the row exists
            return self._pattern_ids[pattern.hash]
        return PatternRow.add(session, pattern)

    def resolve(self, ref: str | int) -> PatternRecord:
        """The pattern a ref (tag, id or hash prefix) names."""
        with self._reading() as session:
            row = PatternRow.find_by_ref(session, ref)
            return _pattern_records(session, [row])[row.id]

    def tag(self, ref: str | int, name: str) -> PatternRecord:
        """Point tag ``name`` at the pattern ``ref`` (moving it if it pointed elsewhere)."""
        if not isinstance(name, str) or not TAG_NAME.fullmatch(name):
            raise BadInput(
                f"tag name must be letters, digits, '.', '_' and '-' (at most {TAG_LENGTH}, "
                f"starting with a letter or digit) and not all digits, got {name!r}"
            )
        with self._writing() as session:
            pattern_id = PatternRow.find_by_ref(session, ref).id
            TagRow.point(session, name, pattern_id)
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
        k = check_int(k, "k", low=1, error=BadInput)
        min_reward = _check_real(min_reward, "min_reward")
        filters = {"space_name": space, "dataset": dataset, "model": model, "name": search}
        filters = {column: value for column, value in filters.items() if value is not None}
        with self._reading() as session:
            tasks = SearchRow.tasks(session, **filters)
            ranked = TrialRow.best_per_pattern(
                session,
                k,
                kind=kind,
                min_reward=min_reward,
                search_ids=list(tasks) if filters else None,
            )
            records = _pattern_records(session, PatternRow.by_ids(session, [r[0] for r in ranked]))
        return [
            from_row(
                RankedPattern,
                tasks[search_id],
                record=records[pattern_id],
                reward=reward,
                trial_id=trial_id,
                search=tasks[search_id].name,
                space=tasks[search_id].space_name,
            )
            for pattern_id, search_id, reward, trial_id in ranked
        ]

    def untried(self, k: int = 10, *, kind: str | None = None) -> list[PatternRecord]:
        """The ``k`` newest patterns with no completed trial (imported patterns, or ones whose
        trials all failed or stopped early), for listings after :meth:`best`'s."""
        k = check_int(k, "k", low=1, error=BadInput)
        with self._reading() as session:
            records = _pattern_records(session, PatternRow.untried(session, k, kind))
        return list(records.values())  # the query's order: newest first

    # files --------------------------------------------------------------------------------
    def export(
        self, ref: str | int, format: str | None = None, path: str | os.PathLike[str] | None = None
    ) -> str:
        """The export text of pattern ``ref`` (JSON unless ``format`` or ``path``'s suffix says
        YAML), written atomically to ``path`` when given.

        The file carries the stored pattern's ``space`` and ``placement`` (where each site went:
        the space's site names, ``modules`` globs and map sizes), which are those of the first
        search or import that stored it: a pattern is stored once, by its hash."""
        format = format or (format_of(path) if path is not None else "json")
        text = dump_pattern(self.resolve(ref).pattern, format)
        if path is not None:
            write_text_atomic(Path(path), text)
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
        row = FinalEvaluationRow(
            seed=check_int(seed, "seed", error=BadInput),
            baseline=None if baseline is None else _check_name(baseline, "baseline"),
            dataset=_check_name(dataset, "dataset"),
            model=_check_name(model, "model"),
            metric=_check_name(metric, "metric"),
            value=check_real(value, "value", error=BadInput),
            created_at=utcnow(),
        )
        pattern_hash = None
        with self._writing() as session:
            if isinstance(pattern, Pattern):
                row.pattern_id, pattern_hash = self._add_pattern(session, pattern), pattern.hash
            elif pattern is not None:
                found = PatternRow.find_by_ref(session, pattern)
                row.pattern_id, pattern_hash = found.id, found.hash
            session.add(row)
            session.flush()
            return from_row(FinalEvaluation, row, pattern_hash=pattern_hash)

    def final_evaluations(
        self,
        pattern: str | int | None = None,
        *,
        dataset: str | None = None,
        model: str | None = None,
        baselines_only: bool = False,
    ) -> list[FinalEvaluation]:
        """Final evaluations of ``pattern`` (else of everything), narrowed by dataset/model."""
        with self._reading() as session:
            pattern_id = None if pattern is None else PatternRow.find_by_ref(session, pattern).id
            query = FinalEvaluationRow.with_hash(
                pattern_id=pattern_id, dataset=dataset, model=model, baselines_only=baselines_only
            )
            return [
                from_row(FinalEvaluation, row, pattern_hash=pattern_hash)
                for row, pattern_hash in session.execute(query)
            ]


# records ----------------------------------------------------------------------------------
def _search_record(row: SearchRow) -> SearchRecord:
    return from_row(SearchRecord, row, controller_settings=dict(row.controller_settings))


def _summary(session: Session, row: SearchRow) -> SearchSummary:
    counts = TrialRow.counts_by_status(session, row.id)
    return SearchSummary(_search_record(row), counts, *TrialRow.best_of_search(session, row.id))


def _trial_record(row: tuple[TrialRow, str, str], metrics: tuple[dict, ...] = ()) -> TrialRecord:
    trial, search, pattern_hash = row
    return from_row(TrialRecord, trial, search=search, pattern_hash=pattern_hash, metrics=metrics)


def _pattern_records(session: Session, rows: Sequence[PatternRow]) -> dict[int, PatternRecord]:
    """Records of pattern ``rows`` with their tags, fetched in one query."""
    tags = TagRow.names_by_pattern(session, [row.id for row in rows])
    return {row.id: from_row(PatternRecord, row, tags=tags.get(row.id, ())) for row in rows}


# argument checks the store alone makes ----------------------------------------------------
def _check_name(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > NAME_LENGTH:
        raise BadInput(
            f"{name} must be a non-empty string of at most {NAME_LENGTH} characters, got {value!r}"
        )
    return value


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadInput(f"{name} must be a string, got {type(value).__name__}")
    return value


def _check_real(value: Any, name: str, **bounds: float) -> float | None:
    """``None``, or ``value`` as a finite float within ``bounds`` (``check_real``'s)."""
    return None if value is None else check_real(value, name, error=BadInput, **bounds)


def _check_state(value: Any, states: Iterable[TrialState | SearchState], name: str) -> Any:
    states = tuple(states)
    return type(states[0])(check_choice(value, [s.value for s in states], name, error=BadInput))


def _check_json(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise BadInput(f"{name} must be a mapping, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise BadInput(f"{name} must hold only JSON values ({error})") from None


def _as_pattern(pattern: Pattern | Mapping[str, Any]) -> Pattern:
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, Mapping):
        return Pattern.from_dict(dict(pattern), "pattern")
    raise BadInput(f"pattern must be a Pattern or a mapping, got {type(pattern).__name__}")


def _metric_steps(metrics: Sequence[Mapping[str, float]]) -> list[tuple[int, dict[str, float]]]:
    """The ``(step, {name: value})`` of each report in ``metrics``, ``None`` values left out."""
    if isinstance(metrics, (str, bytes, Mapping)) or not isinstance(metrics, Iterable):
        raise BadInput(
            "metrics must be a list of per-step mappings of metric name -> number, "
            f"got {type(metrics).__name__}"
        )
    steps: dict[int, dict[str, float]] = {}
    for position, report in enumerate(metrics):
        where = f"metrics[{position}]"
        if not isinstance(report, Mapping):
            raise BadInput(
                f"{where} must be a mapping of metric name -> number, got {type(report).__name__}"
            )
        step = report.get("step", position)
        integral = (
            isinstance(step, Real) and not isinstance(step, bool) and float(step).is_integer()
        )
        if not integral or step < 0:
            raise BadInput(f"{where}.step must be a non-negative integer, got {step!r}")
        if int(step) in steps:
            raise BadInput(f"{where}.step: step {int(step)} reported twice")
        steps[int(step)] = values = {}
        for metric, value in report.items():
            if metric == "step" or value is None:  # None: not reported at this step
                continue
            _check_name(metric, f"{where} metric name")
            if isinstance(value, bool) or not isinstance(value, Real):
                raise BadInput(f"{where}.{metric} must be a number, got {value!r}")
            values[metric] = float(value)
    return list(steps.items())
