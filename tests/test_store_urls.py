"""Where the store lives (default, XDG, environment, plain paths) and how URLs are redacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from autodropout.errors import BadInput
from patterns_db.urls import redact, resolve_url, scrub, sqlite_path


def test_default_is_a_sqlite_file_under_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTODROPOUT_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert sqlite_path(resolve_url()) == tmp_path / "autodropout" / "patterns.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".local" / "share" / "autodropout" / "patterns.db"
    assert sqlite_path(resolve_url()) == expected


def test_explicit_url_beats_the_environment_which_beats_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTODROPOUT_DB", "postgresql://u@db.example/patterns")
    env = resolve_url()
    assert (env.drivername, env.host, env.database) == (
        "postgresql+psycopg",
        "db.example",
        "patterns",
    )
    assert sqlite_path(resolve_url(str(tmp_path / "mine.db"))) == tmp_path / "mine.db"
    assert resolve_url("sqlite:///:memory:").database == ":memory:"
    assert sqlite_path(resolve_url("sqlite:///:memory:")) is None


def test_malformed_urls_are_bad_input_without_their_password():
    with pytest.raises(BadInput, match="not a valid SQLAlchemy URL") as error:
        resolve_url("postgresql://user:hunter2@host:notaport/db")
    assert "hunter2" not in str(error.value)


def test_redact_masks_passwords_and_secret_query_parameters():
    url = "postgresql+psycopg://alice:hunter2@db:5432/patterns?sslmode=require&password=hunter3"
    shown = redact(url)
    assert "hunter2" not in shown and "hunter3" not in shown
    assert shown.startswith("postgresql+psycopg://alice:***@db:5432/patterns")
    assert "sslmode=require" in shown
    assert redact("sqlite:////tmp/p.db") == "sqlite:////tmp/p.db"


def test_scrub_removes_every_form_of_the_password_from_messages():
    url = resolve_url("postgresql://alice:p%40ss%2Fw0rd@db/patterns")
    raw = url.render_as_string(hide_password=False)
    message = f"failed for {raw}: password p@ss/w0rd rejected (p%40ss%2Fw0rd)"
    cleaned = scrub(message, url)
    assert "p@ss/w0rd" not in cleaned and "p%40ss%2Fw0rd" not in cleaned
    assert cleaned.count("***") == 3
    assert Path(sqlite_path(resolve_url("sqlite:///rel.db"))).name == "rel.db"
