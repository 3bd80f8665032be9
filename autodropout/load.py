"""Load a built-in, exported or stored pattern: ``load_pattern(ref, db=None)``.

Reading a built-in pattern (:mod:`autodropout.builtin`) or a pattern file
(:mod:`autodropout.patterns.files`) needs no database; a store reference imports the store,
and SQLAlchemy, only then. This is the one place the public face reaches up into the store,
and it does so inside the function.
"""

from __future__ import annotations

import os

from .builtin import is_builtin_ref, resolve_builtin
from .patterns.files import is_pattern_file, read_pattern_file
from .patterns.pattern import Pattern


def load_pattern(ref: str | os.PathLike[str], db: str | None = None) -> Pattern:
    """The pattern named by ``ref``: a built-in, a pattern file, a tag, a stored id or a hash
    prefix.

    ``builtin:NAME`` (or ``builtin:NAME@VERSION``, which must be the shipped version) is the
    built-in pattern ``NAME`` (see :func:`~autodropout.builtin.builtin_patterns`). Otherwise
    ``ref`` is a file when it is a path object, an existing file, or ends in ``.json``,
    ``.yaml`` or ``.yml``; any other ref is looked up in the store at ``db`` (a SQLAlchemy
    URL or SQLite path; default ``$AUTODROPOUT_DB``, else the user's SQLite store).
    A pattern a search found keeps its space's ``placement``, so ``apply_pattern(model,
    pattern)`` puts its sites where the search did.
    Raises :class:`~autodropout.errors.NotFound` for an unknown ref or a missing file and
    :class:`~autodropout.patterns.PatternError` for a malformed one.
    """
    if is_builtin_ref(ref):
        return resolve_builtin(ref).pattern
    if is_pattern_file(ref):
        return read_pattern_file(ref)
    from patterns_db.store import PatternStore

    with PatternStore(db, create=False) as store:
        return store.resolve(str(ref)).pattern
