"""Load a stored or exported pattern for a training pipeline: ``load_pattern(ref, db=None)``.

An exported pattern file is the pattern's own JSON/YAML form plus a ``hash`` field: the
SHA-256 of its content, checked by :class:`Pattern` on reading so a corrupted or hand-edited
file is refused (files written by hand, without ``hash``, are read as plain patterns). Reading a file needs
no database; a database reference imports the store (and SQLAlchemy) only then.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import NotFound
from .patterns import Pattern, PatternError

FILE_SUFFIXES = (".json", ".yaml", ".yml")
FORMATS = ("json", "yaml")


def load_pattern(ref: str | os.PathLike[str], db: str | None = None) -> Pattern:
    """The pattern named by ``ref``: a tag, a stored id, a hash prefix, or a pattern file.

    ``ref`` is a file when it is a path object, an existing file, or ends in ``.json``,
    ``.yaml`` or ``.yml``; any other ref is looked up in the store at ``db`` (a SQLAlchemy
    URL or SQLite path; default ``$AUTODROPOUT_DB``, else the user's SQLite store).
    Raises :class:`~autodropout.errors.NotFound` for an unknown ref or a missing file and
    :class:`PatternError` for a malformed one.
    """
    if _is_file_ref(ref):
        return read_pattern_file(ref)
    from patterns_db.store import PatternStore

    with PatternStore(db, create=False) as store:
        return store.resolve(str(ref)).pattern


def _is_file_ref(ref: str | os.PathLike[str]) -> bool:
    if isinstance(ref, os.PathLike):
        return True
    return os.path.isfile(ref) or ref.lower().endswith(FILE_SUFFIXES)


def format_of(path: str | os.PathLike[str]) -> str:
    """``"yaml"`` for ``.yaml``/``.yml`` files, else ``"json"``."""
    return "yaml" if Path(path).suffix.lower() in (".yaml", ".yml") else "json"


def dump_pattern(pattern: Pattern, format: str = "json") -> str:
    """The export text of ``pattern``: its fields plus the ``hash`` that guards them."""
    if format not in FORMATS:
        raise PatternError(f"format: must be one of {', '.join(FORMATS)}; got {format!r}")
    if format == "yaml":
        return pattern.to_yaml(with_hash=True)
    return json.dumps(pattern.to_dict(with_hash=True), sort_keys=True, indent=2) + "\n"


def read_pattern_file(path: str | os.PathLike[str]) -> Pattern:
    """Read and check a pattern file; the error names the file and the faulty field."""
    if not Path(path).is_file():
        raise NotFound(f"{path}: no such pattern file")
    return Pattern.load(path)
