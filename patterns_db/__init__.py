"""The pattern store: SQLAlchemy models, Alembic migrations and the ``PatternStore`` API
holding every search, trial, found pattern, tag and final evaluation."""
