"""Where the pattern store lives: the database URL, its default, and its redacted form.

The URL is chosen in this order: an explicit ``--db``/``url`` argument, the ``AUTODROPOUT_DB``
environment variable, then a SQLite file at ``$XDG_DATA_HOME/autodropout/patterns.db``
(``~/.local/share/autodropout/patterns.db`` when ``XDG_DATA_HOME`` is unset). A plain path
without a ``scheme://`` is a SQLite file. Credentials never leave this module unmasked:
logs and error messages use :func:`redact` and :func:`scrub`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from autodropout.errors import BadInput

ENV_VAR = "AUTODROPOUT_DB"
MASK = "***"
_USERINFO_PASSWORD = re.compile(r"(://[^:/@]*:)[^/]*@")
_SECRET_QUERY_KEYS = ("password", "passwd", "sslpassword", "secret", "token")


def default_path() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(data_home) / "autodropout" / "patterns.db"


def resolve_url(url: str | URL | None = None) -> URL:
    """The store URL: ``url``, else ``$AUTODROPOUT_DB``, else the default SQLite file."""
    if url is None or url == "":
        url = os.environ.get(ENV_VAR) or None
    if url is None:
        return URL.create("sqlite", database=str(default_path()))
    if isinstance(url, URL):
        return _with_default_driver(url)
    if "://" not in url:
        return URL.create("sqlite", database=str(Path(url).expanduser()))
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise BadInput(f"database URL {redact(url)}: not a valid SQLAlchemy URL") from None
    return _with_default_driver(parsed)


def _with_default_driver(url: URL) -> URL:
    # SQLAlchemy's default PostgreSQL driver is psycopg2; this package ships psycopg 3.
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    return url


def sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL; ``None`` for other databases and in-memory SQLite."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def redact(url: str | URL) -> str:
    """``url`` as text with its password (and secret query parameters) masked."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return _USERINFO_PASSWORD.sub(rf"\1{MASK}@", url)
    query = {
        key: (MASK if key.lower() in _SECRET_QUERY_KEYS else value)
        for key, value in parsed.query.items()
    }
    return parsed.set(query=query).render_as_string(hide_password=True)


def secrets(url: URL) -> list[str]:
    """The credential strings of ``url`` that must never be shown."""
    found = [url.password] if url.password else []
    for key, value in url.query.items():
        if key.lower() in _SECRET_QUERY_KEYS:
            found.extend([value] if isinstance(value, str) else value)
    return [secret for secret in found if secret]


def scrub(text: str, url: URL) -> str:
    """``text`` (a driver's error message, say) with every credential of ``url`` masked."""
    text = text.replace(url.render_as_string(hide_password=False), redact(url))
    for secret in secrets(url):
        for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
            text = text.replace(form, MASK)
    return text
