"""The store's schema version: Alembic migrations shipped in ``patterns_db/migrations``.

Opening a store brings its database to the head revision: an empty database is created, an
older one is upgraded in place (under a lock, so concurrent openers migrate it once), and a
database from a newer autodropout, or one holding foreign tables of the same names, is
refused with a :class:`~patterns_db.errors.StoreError` that says what to do.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from .engine import WRITE
from .errors import StoreError
from .models import Base

VERSION_TABLE = "autodropout_schema_version"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_LOCK_KEY = zlib.crc32(b"autodropout.patterns_db.schema")

log = logging.getLogger(__name__)


def alembic_config(connection: Connection | None = None) -> Config:
    """An ``alembic.ini``-free Alembic configuration bound to ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def known_revisions() -> set[str]:
    return {
        script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    }


def current_revision(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` inside the caller's transaction."""
    command.upgrade(alembic_config(connection), revision)


def ensure_schema(engine: Engine, shown_url: str) -> None:
    """Bring the database behind ``engine`` to the head revision, or refuse it."""
    head = head_revision()
    with engine.connect() as connection:
        if current_revision(connection) == head:
            return
    with engine.connect().execution_options(**WRITE) as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        current = current_revision(connection)
        if current == head:
            return
        _check_upgradable(connection, current, head, shown_url)
        log.info("pattern store %s: schema %s -> %s", shown_url, current or "(empty)", head)
        upgrade(connection)


def _check_upgradable(connection: Connection, current: str | None, head: str, shown: str) -> None:
    if current is None:
        ours = set(Base.metadata.tables)
        clashing = sorted(ours & set(inspect(connection).get_table_names()))
        if clashing:
            raise StoreError(
                f"{shown} has tables {', '.join(clashing)} but no {VERSION_TABLE} table: it is "
                "not an autodropout pattern store; use an empty database or another schema"
            )
    elif current not in known_revisions():
        raise StoreError(
            f"{shown} has pattern store schema revision {current!r}, newer than this "
            f"autodropout knows (up to {head!r}); upgrade autodropout "
            "(pip install -U autodropout) to open it"
        )
