"""Alembic environment of the pattern store, driven programmatically by ``patterns_db.schema``.

There is no ``alembic.ini``: the caller puts an open SQLAlchemy ``Connection`` (inside a
transaction it commits itself) in ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context

from patterns_db.models import Base
from patterns_db.schema import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
