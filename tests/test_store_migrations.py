"""The store schema: migrations equal the models, old databases upgrade, newer ones are refused."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from patterns_db import PatternStore, StoreError
from patterns_db.models import Base
from patterns_db.schema import VERSION_TABLE, current_revision, head_revision, upgrade

FIRST_REVISION = "0001"


@pytest.fixture
def engine(db_url):
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


def test_migrations_build_exactly_the_models(db_url, engine):
    PatternStore(db_url).close()
    with engine.connect() as connection:
        options = {"compare_type": True, "version_table": VERSION_TABLE}
        context = MigrationContext.configure(connection, opts=options)
        assert compare_metadata(context, Base.metadata) == []
        assert current_revision(connection) == head_revision()


def test_a_database_at_the_first_revision_opens_and_upgrades(db_url, engine):
    assert head_revision() != FIRST_REVISION
    with engine.begin() as connection:
        upgrade(connection, FIRST_REVISION)
        connection.execute(
            text(
                "INSERT INTO searches (name, space_name, space_yaml, dataset, model, "
                "controller_settings, status, started_at) VALUES ('old', 'wrn-space', 'x: 1', "
                "'fashion', 'wrn', '{\"lr\": 0.1}', 'completed', '2024-05-01 12:00:00')"
            )
        )
    with engine.connect() as connection:
        assert current_revision(connection) == FIRST_REVISION
    with PatternStore(db_url) as store:
        old = store.get_search("old")
        assert (old.status, old.controller_settings) == ("completed", {"lr": 0.1})
        assert store.load_controller_state("old") is None
        store.save_controller_state("old", b"warm")
        assert store.load_controller_state("old") == b"warm"
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()


def test_a_newer_database_is_refused_with_what_to_do(db_url, engine):
    PatternStore(db_url).close()
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(
        StoreError,
        match=r"revision '9999', newer than this autodropout knows "
        r"\(up to '\d+'\); upgrade autodropout \(pip install -U autodropout\)",
    ):
        PatternStore(db_url)


def test_foreign_tables_of_the_same_names_are_refused(db_url, engine):
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE trials (id INTEGER PRIMARY KEY)"))
    with pytest.raises(StoreError, match=f"has tables trials but no {VERSION_TABLE} table"):
        PatternStore(db_url)
