"""Pattern files: the one module that reads, writes and recognises exported patterns.

An exported pattern file is the pattern's own JSON/YAML form plus a ``hash`` field: the
SHA-256 of its content, checked on reading so that a corrupted or hand-edited file is
refused (files written by hand, without ``hash``, are read as plain patterns). A pattern a
search found carries its space's ``placement`` (site names, module globs, map sizes: format
``autodropout.pattern/2``, see :mod:`~autodropout.patterns.pattern`), outside the hash like
``space``, so the file applies as searched. Nothing here
imports torch or a database: the store and the CLI read and write files through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from autodropout.atomic import write_text_atomic
from autodropout.errors import NotFound

from .fields import PatternError
from .pattern import YAML_SUFFIXES, Pattern

FILE_SUFFIXES = (".json", *YAML_SUFFIXES)
FORMATS = ("json", "yaml")


def is_pattern_file(ref: str | os.PathLike[str]) -> bool:
    """Whether ``ref`` names a pattern file: a path object, an existing file, or a name ending
    in ``.json``, ``.yaml`` or ``.yml`` (anything else is a store reference)."""
    if isinstance(ref, os.PathLike):
        return True
    return os.path.isfile(ref) or ref.lower().endswith(FILE_SUFFIXES)


def format_of(path: str | os.PathLike[str]) -> str:
    """``"yaml"`` for ``.yaml``/``.yml`` files, else ``"json"``."""
    return "yaml" if Path(path).suffix.lower() in YAML_SUFFIXES else "json"


def dump_pattern(pattern: Pattern, format: str = "json", with_hash: bool = True) -> str:
    """The file text of ``pattern``: its fields, plus the ``hash`` that guards them."""
    if format not in FORMATS:
        raise PatternError(f"format must be one of [{', '.join(FORMATS)}], got {format!r}")
    if format == "yaml":
        return pattern.to_yaml(with_hash=with_hash)
    return json.dumps(pattern.to_dict(with_hash=with_hash), sort_keys=True, indent=2) + "\n"


def read_pattern_file(path: str | os.PathLike[str]) -> Pattern:
    """Read and check a pattern file; the error names the file and the faulty field.

    Raises :class:`~autodropout.errors.NotFound` for a missing file and
    :class:`~autodropout.patterns.PatternError` for an unreadable or malformed one.
    """
    if not Path(path).is_file():
        raise NotFound(f"{path}: no such pattern file")
    return Pattern.load(path)


def write_pattern_file(pattern: Pattern, path: str | os.PathLike[str],
                       format: str | None = None, with_hash: bool = True) -> Path:
    """Write ``pattern`` to ``path`` atomically (JSON unless ``format`` or the suffix says
    YAML); a reader never sees a half-written file."""
    path = Path(path)
    write_text_atomic(path, dump_pattern(pattern, format or format_of(path), with_hash))
    return path
