"""Shared fixtures: one local Ray session for the whole run, seeded torch."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Test tensors are tiny: extra intra-op threads only add contention on a 2-core CI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test that needs it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data_dir() -> str:
    """The machine's offline copy of the benchmark datasets (../shared/data)."""
    path = os.path.abspath(os.environ.get("AUTODROPOUT_DATA_DIR", SHARED_DATA_DIR))
    if not os.path.isdir(path):
        pytest.skip(f"no shared data directory at {path}")
    return path


# --- pattern store (tests/test_store*.py, tests/test_cli_store.py) ------------------------
STORE_BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.postgres))


@pytest.fixture(scope="session")
def pg_test_database():
    """A PostgreSQL database of its own for this test run, dropped at the end; ``None`` when
    ``AUTODROPOUT_TEST_PG_URL`` is unset."""
    base = os.environ.get("AUTODROPOUT_TEST_PG_URL")
    if not base:
        yield None
        return
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"autodropout_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=STORE_BACKENDS)
def db_url(request, tmp_path) -> str:
    """An empty pattern-store database URL: a temporary SQLite file, then (when
    ``AUTODROPOUT_TEST_PG_URL`` is set) a fresh schema in this run's PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'patterns.db'}"
        return
    database = request.getfixturevalue("pg_test_database")
    if database is None:
        pytest.skip("AUTODROPOUT_TEST_PG_URL is not set")
    import uuid

    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(database, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = database.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
