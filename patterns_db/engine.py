"""SQLAlchemy engines for the store: SQLite in WAL mode with a busy timeout, or PostgreSQL.

SQLite gets explicit transaction control: reads ``BEGIN`` (deferred), writes ``BEGIN
IMMEDIATE`` so a writer takes the lock up front and waits up to the busy timeout instead of
failing half way; connections marked with :data:`WRITE` begin immediate transactions.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL

from .urls import sqlite_path

SQLITE_BUSY_TIMEOUT_S = 30.0
WRITE: dict[str, Any] = {"autodropout_write": True}
"""Execution options of a connection that writes."""


def create_store_engine(url: URL) -> Engine:
    if url.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True)
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _configure_sqlite)
    event.listen(engine, "begin", _begin_sqlite)
    return engine


def _configure_sqlite(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.isolation_level = None  # BEGIN is emitted by _begin_sqlite
    cursor = dbapi_connection.cursor()
    try:
        _enable_wal(cursor)
        # FULL: a committed trial survives power loss too (nothing is ever lost from the
        # store); the fsync per commit costs milliseconds against trials of seconds or more.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    """Switch to WAL, waiting up to the busy timeout. The switch needs an exclusive lock and
    SQLite does not wait for it: while another connection holds a lock (e.g. one creating the
    file) it either raises "database is locked" or silently keeps the old mode."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal":
                return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error):
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("database is locked: could not switch to WAL mode")
        time.sleep(0.05)


def _begin_sqlite(connection: Any) -> None:
    immediate = connection.get_execution_options().get("autodropout_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
