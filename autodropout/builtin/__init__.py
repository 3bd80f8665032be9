"""Built-in patterns: searched dropout patterns shipped inside the package, by name.

Each built-in is a pattern file ``NAME.json`` in this folder, as
:func:`~autodropout.patterns.files.write_pattern_file` writes it (with the ``hash`` that is
checked on reading), and an entry of ``catalog.json`` that gives its version and where it
came from: space, dataset, model, search, validation and test scores, report (the format is
:mod:`autodropout.builtin.catalog`'s). ``builtin_pattern("wrn-fashion-mnist").pattern`` or
``load_pattern("builtin:wrn-fashion-mnist")`` reads one with no database, no Ray and no
network; :mod:`importlib.resources` finds the files in an editable or a regular install. A
pattern file must match the hash its catalog entry records, so a file replaced without its
provenance is refused. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autodropout.atomic import write_text_atomic
from autodropout.errors import BadInput, NotFound
from autodropout.patterns.fields import CONV, SEQUENCE, PatternError
from autodropout.patterns.files import write_pattern_file
from autodropout.patterns.pattern import Pattern

from .catalog import check_entry, dump_catalog, parse_catalog

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PREFIX = "builtin:"
CATALOG = "catalog.json"
MAP_RANKS = {CONV: 3, SEQUENCE: 2}
"""The length of ``map_shape`` per pattern kind: (C, H, W) or (T, C)."""


@dataclass(frozen=True)
class BuiltinPattern:
    """A built-in pattern and its catalog entry (the fields of
    :mod:`autodropout.builtin.catalog`; ``test`` values are ``None`` where not measured)."""

    name: str
    version: int
    file: str
    hash: str
    summary: str
    space: str
    dataset: str
    model: str
    model_args: dict[str, Any]
    map_shape: tuple[int, ...]
    search: dict[str, Any]
    validation: dict[str, Any]
    test: dict[str, Any]
    report: str
    pattern: Pattern = field(repr=False, compare=False)

    @property
    def ref(self) -> str:
        """``builtin:NAME@VERSION``, the reference that names exactly this pattern."""
        return f"{PREFIX}{self.name}@{self.version}"

    def entry(self) -> dict[str, Any]:
        """The catalog entry, as plain JSON data (a copy)."""
        entry = {item.name: getattr(self, item.name) for item in fields(self)
                 if item.name != "pattern"}
        return copy.deepcopy({**entry, "map_shape": list(self.map_shape)})


def builtin_patterns(folder: str | os.PathLike[str] | None = None) -> list[BuiltinPattern]:
    """Every built-in pattern, by name; ``folder`` reads the catalog there instead of the
    package's."""
    root = _root(folder)
    return [_load(root, entry) for entry in _entries(root)]


def builtin_pattern(name: str, folder: str | os.PathLike[str] | None = None) -> BuiltinPattern:
    """The built-in pattern ``name``; :class:`~autodropout.errors.NotFound` lists the names."""
    root = _root(folder)
    entries = {entry["name"]: entry for entry in _entries(root)}
    if name not in entries:
        raise NotFound(f"unknown built-in pattern {name!r}; must be one of "
                       f"[{', '.join(entries)}]")
    return _load(root, entries[name])


def is_builtin_ref(ref: Any) -> bool:
    """Whether ``ref`` is a string that names a built-in pattern: ``builtin:NAME[@VERSION]``."""
    return isinstance(ref, str) and ref.strip().startswith(PREFIX)


def resolve_builtin(ref: str, folder: str | os.PathLike[str] | None = None) -> BuiltinPattern:
    """The built-in pattern ``builtin:NAME`` or ``builtin:NAME@VERSION`` names.

    A ``VERSION`` other than the shipped one is :class:`~autodropout.errors.NotFound` (the
    catalog holds one version of each name); a malformed ref is
    :class:`~autodropout.errors.BadInput`.
    """
    if not is_builtin_ref(ref):
        raise BadInput(f"{ref!r}: a built-in pattern ref is {PREFIX}NAME[@VERSION]")
    name, at, version = ref.strip().removeprefix(PREFIX).partition("@")
    if at and not version.isdigit():
        raise BadInput(f"{ref.strip()!r}: VERSION must be a positive integer, got {version!r}")
    builtin = builtin_pattern(name, folder)
    if at and int(version) != builtin.version:
        raise NotFound(f"{ref.strip()!r}: built-in pattern {name!r} is version "
                       f"{builtin.version}, not {int(version)}")
    return builtin


def write_builtin(pattern: Pattern, entry: Mapping[str, Any],
                  folder: str | os.PathLike[str] | None = None) -> BuiltinPattern:
    """Ship ``pattern`` as the built-in ``entry["name"]``: write ``NAME.json`` and put
    ``entry`` into the catalog, replacing the entry of that name (``folder``: another folder
    than the package's). ``file`` and ``hash`` are set from the name and the pattern; a
    pattern other than the one shipped under the name needs a higher ``version``. Returns
    the built-in as the loader reads it back.
    """
    root = Path(folder) if folder is not None else Path(str(resources.files(__name__)))
    name = entry.get("name")
    checked = check_entry({**entry, "file": f"{name}.json", "hash": pattern.hash})
    _check_fits(pattern, checked, f"entry {name}")
    shipped = _entries(root) if (root / CATALOG).is_file() else []
    _check_version(checked, shipped)
    root.mkdir(parents=True, exist_ok=True)
    write_pattern_file(pattern, root / checked["file"])
    others = [old for old in shipped if old["name"] != name]
    write_text_atomic(root / CATALOG, dump_catalog([*others, checked]))
    return _load(root, checked)


def _root(folder: str | os.PathLike[str] | None) -> Traversable:
    return Path(folder) if folder is not None else resources.files(__name__)


def _entries(root: Traversable) -> list[dict[str, Any]]:
    path = root / CATALOG
    return parse_catalog(_read(path, "built-in catalog"), str(path))


def _read(path: Traversable, what: str) -> str:
    if not path.is_file():
        raise NotFound(f"{path}: no such {what}")
    return path.read_text(encoding="utf-8")


def _load(root: Traversable, entry: dict[str, Any]) -> BuiltinPattern:
    """The built-in of a checked catalog ``entry``: its pattern file read, its hash checked
    against the file's own and the catalog's."""
    path = root / entry["file"]
    pattern = Pattern.from_json(_read(path, "pattern file"), str(path))
    if pattern.hash != entry["hash"]:
        raise PatternError(f"{path}: holds pattern {pattern.hash[:12]}..., its catalog entry "
                           f"{entry['hash'][:12]}...: the file was replaced without its entry")
    _check_fits(pattern, entry, str(path))
    return BuiltinPattern(**{**entry, "map_shape": tuple(entry["map_shape"])}, pattern=pattern)


def _check_fits(pattern: Pattern, entry: dict[str, Any], where: str) -> None:
    """The entry's ``map_shape`` has the rank of the pattern's kind, and its ``space`` is the
    pattern's own (when the pattern names one)."""
    rank = MAP_RANKS[pattern.kind]
    if len(entry["map_shape"]) != rank:
        raise BadInput(f"{where}: map_shape must have {rank} sizes for a {pattern.kind} "
                       f"pattern, got {entry['map_shape']}")
    if pattern.space is not None and pattern.space != entry["space"]:
        raise BadInput(f"{where}: space is {entry['space']!r} but the pattern's is "
                       f"{pattern.space!r}")


def _check_version(entry: dict[str, Any], shipped: list[dict[str, Any]]) -> None:
    """A different pattern under a shipped name must raise its version."""
    old = next((old for old in shipped if old["name"] == entry["name"]), None)
    if old is not None and old["hash"] != entry["hash"] and entry["version"] <= old["version"]:
        raise BadInput(f"entry {entry['name']}.version: the pattern differs from the shipped "
                       f"version {old['version']} ({old['hash'][:12]}...), so version must be "
                       f"> {old['version']}, got {entry['version']}")
