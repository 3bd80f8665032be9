"""Four processes writing 200 trials each into one store lose none and duplicate none."""

from __future__ import annotations

import multiprocessing

import pytest
from sqlalchemy import create_engine, func, select

from autodropout.patterns import Pattern
from patterns_db import PatternStore
from patterns_db.models import PatternRow, TrialMetricRow, TrialRow

WORKERS = 4
TRIALS = 200
SHARED_PATTERNS = 20  # every worker tries the same few patterns, so pattern inserts race too
RESUMED_EVERY = 10  # every 10th trial is reported twice, like a resumed search does
STEPS = 2

_start_together: multiprocessing.synchronize.Barrier | None = None


def _pattern(index: int) -> Pattern:
    site = {
        "size_h": 1 + index % SHARED_PATTERNS,
        "size_w": 3,
        "stride": 6,
        "repeat": 2,
        "rotate": 0.0,
        "shear_x": 0.0,
        "shear_y": 0.0,
        "share_c": False,
        "residual": False,
    }
    return Pattern("conv", [site])


def _reward(worker: int, index: int) -> float:
    return worker + index / 1000


def _hold(barrier) -> None:
    global _start_together
    _start_together = barrier


def _write_trials(db_url: str, worker: int) -> int:
    _start_together.wait(timeout=300)  # four writers, all at once, on a fresh database
    with PatternStore(db_url) as store:
        store.create_search("race", "space", "x: 1\n", "fashion", "wrn", resume=True)
        for index in range(TRIALS):
            reports = 2 if index % RESUMED_EVERY == 0 else 1
            for report in range(reports):
                store.record_trial(
                    "race",
                    f"w{worker}-{index}",
                    _pattern(index),
                    reward=_reward(worker, index) if report == reports - 1 else -1.0,
                    metrics=[{"acc": step / STEPS} for step in range(STEPS)],
                    node=f"n{worker}",
                )
    return worker


@pytest.fixture(scope="module")
def writers():
    context = multiprocessing.get_context("spawn")
    with context.Pool(WORKERS, initializer=_hold, initargs=(context.Barrier(WORKERS),)) as pool:
        yield pool


@pytest.mark.slow
def test_concurrent_writers_lose_and_duplicate_nothing(db_url, writers):
    done = writers.starmap(_write_trials, [(db_url, worker) for worker in range(WORKERS)], 1)
    assert sorted(done) == list(range(WORKERS))
    with PatternStore(db_url) as store:
        trials = store.trials("race")
    expected = {f"w{w}-{i}": _reward(w, i) for w in range(WORKERS) for i in range(TRIALS)}
    assert len(trials) == WORKERS * TRIALS
    assert {t.trial_id: t.reward for t in trials} == expected
    assert all(len(t.metrics) == STEPS for t in trials)
    engine = create_engine(db_url)
    with engine.connect() as connection:

        def count(column):
            return connection.execute(select(func.count(column))).scalar_one()

        assert count(TrialRow.id) == WORKERS * TRIALS
        assert count(TrialMetricRow.value) == WORKERS * TRIALS * STEPS
        assert count(PatternRow.id) == SHARED_PATTERNS
    engine.dispose()
