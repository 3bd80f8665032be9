"""Pattern store benchmark: trial insert rate and best-10 query latency, SQLite and PostgreSQL.

Records ``--trials`` trials (default 100k) one ``record_trial`` call at a time, as the search
service does, over ``--searches`` searches on two datasets and two models, each trial with
``--steps`` steps of two metrics; then times ``best(10)`` queries, unfiltered and filtered.
Targets: recording a trial under 5 ms, best-10 under 50 ms.

    python benchmarks/store.py                      # SQLite in a temp dir, PostgreSQL if
    python benchmarks/store.py --trials 10000       # $AUTODROPOUT_TEST_PG_URL is set
    python benchmarks/store.py --pg postgresql+psycopg://postgres@127.0.0.1:5432/test

PostgreSQL runs in a fresh database created next to the one ``--pg`` names, dropped after.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from autodropout.patterns import Pattern
from patterns_db import PatternStore, TrialState

RECORD_TARGET_MS = 5.0
BEST_TARGET_MS = 50.0
QUERY_REPEATS = 25
DATASETS = ("fashion", "cifar10")
MODELS = ("wrn-28-2", "resnet-18")


def random_pattern(rng: random.Random) -> Pattern:
    sites = [
        {
            "size_h": rng.randint(1, 8),
            "size_w": rng.randint(1, 8),
            "stride": rng.randint(2, 16),
            "repeat": rng.choice(["fill", 1, 2, 3, 4]),
            "rotate": rng.choice([0.0, 15.0, 45.0]),
            "shear_x": round(rng.uniform(-0.5, 0.5), 2),
            "shear_y": round(rng.uniform(-0.5, 0.5), 2),
            "share_c": rng.random() < 0.5,
            "residual": rng.random() < 0.5,
        }
        for _ in range(rng.randint(1, 3))
    ]
    return Pattern("conv", sites, space="bench-space")


def fill(store: PatternStore, trials: int, searches: int, steps: int, seed: int) -> list[float]:
    """Record ``trials`` trials; return each ``record_trial`` call's latency in ms."""
    rng = random.Random(seed)
    pool = [random_pattern(rng) for _ in range(max(1, trials // 2))]  # some patterns repeat
    names = []
    for index in range(searches):
        name = f"bench-{index}"
        store.create_search(
            name,
            "bench-space",
            "name: bench-space\n",
            DATASETS[index % 2],
            MODELS[(index // 2) % 2],
            {"seed": index},
        )
        names.append(name)
    latencies = []
    for index in range(trials):
        reward = rng.random()
        metrics = [
            {"accuracy": reward * (s + 1) / steps, "loss": 1.0 - reward * s / steps}
            for s in range(steps)
        ]
        status = (
            TrialState.COMPLETED
            if rng.random() < 0.9
            else rng.choice([TrialState.FAILED, TrialState.EARLY_STOPPED])
        )
        start = time.perf_counter()
        store.record_trial(
            names[index % searches],
            f"trial-{index:07d}",
            rng.choice(pool),
            reward=reward,
            metrics=metrics,
            status=status,
            duration=rng.uniform(30, 300),
            node=f"node-{index % 8}",
        )
        latencies.append((time.perf_counter() - start) * 1000)
    return latencies


def time_query(query: Callable[[], object]) -> list[float]:
    query()  # warm caches and the connection pool
    timings = []
    for _ in range(QUERY_REPEATS):
        start = time.perf_counter()
        query()
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def run(name: str, url: str, args: argparse.Namespace) -> None:
    with PatternStore(url) as store:
        start = time.perf_counter()
        latencies = fill(store, args.trials, args.searches, args.steps, args.seed)
        elapsed = time.perf_counter() - start
        latencies.sort()
        print(f"\n[{name}] {store.url}")
        print(
            f"  insert: {args.trials} trials in {elapsed:.1f} s = {args.trials / elapsed:.0f} "
            f"trials/s; record_trial ms mean {statistics.fmean(latencies):.2f} "
            f"p50 {latencies[len(latencies) // 2]:.2f} "
            f"p99 {latencies[int(len(latencies) * 0.99)]:.2f} (target < {RECORD_TARGET_MS:g})"
        )
        queries = {
            "best(10)": lambda: store.best(10),
            "best(10, dataset, model)": lambda: store.best(
                10, dataset="cifar10", model="resnet-18"
            ),
            "best(10, kind, space)": lambda: store.best(10, kind="conv", space="bench-space"),
            "best(10, min_reward=0.5)": lambda: store.best(10, min_reward=0.5),
        }
        for stage in ("as filled", "after ANALYZE"):
            if stage == "after ANALYZE":  # what autovacuum (PostgreSQL) or PRAGMA optimize does
                with store._engine.connect() as connection:
                    connection.exec_driver_sql("ANALYZE")
                    connection.commit()
            for label, query in queries.items():
                timings = sorted(time_query(query))
                print(
                    f"  {label:<26} {stage:<13} ms median {statistics.median(timings):.2f} "
                    f"max {timings[-1]:.2f} (target < {BEST_TARGET_MS:g})"
                )


@contextmanager
def scratch_postgres(base_url: str) -> Iterator[str]:
    name = f"autodropout_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100_000)
    parser.add_argument("--searches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="reported steps per trial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pg",
        default=os.environ.get("AUTODROPOUT_TEST_PG_URL"),
        help="PostgreSQL server URL (default $AUTODROPOUT_TEST_PG_URL)",
    )
    parser.add_argument("--no-sqlite", action="store_true")
    args = parser.parse_args()
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as directory:
            run("sqlite", f"sqlite:///{directory}/bench.db", args)
    if args.pg:
        with scratch_postgres(args.pg) as url:
            run("postgresql", url, args)
    else:
        print("\n[postgresql] skipped: pass --pg or set AUTODROPOUT_TEST_PG_URL")


if __name__ == "__main__":
    main()
