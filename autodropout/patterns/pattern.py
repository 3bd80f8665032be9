"""``Pattern``: an immutable dropout pattern with a canonical JSON form and a content hash.

File formats: ``autodropout.pattern/2`` adds the optional top-level ``placement`` (where
each site went in its search: :class:`SitePlacement`) to ``autodropout.pattern/1``. A
pattern is written in the oldest format that holds it (``/1`` without placement, so such
files read as before everywhere); both are read, and a ``/1`` file may not hold
``placement``. A file without ``format`` is read as the newest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from autodropout.atomic import write_text_atomic
from autodropout.validation import check_int

from .fields import PatternError, check_kind, check_site

YAML_SUFFIXES = (".yaml", ".yml")

FORMAT_V1 = "autodropout.pattern/1"
FORMAT = "autodropout.pattern/2"
READABLE_FORMATS = (FORMAT_V1, FORMAT)
_TOP_LEVEL = ("format", "hash", "kind", "placement", "sites", "space")
_PLACEMENT_KEYS = ("name", "modules", "map_size")


@dataclass(frozen=True)
class SitePlacement:
    """Where one site of a pattern went in the search that found it (metadata).

    ``name`` is the site's name in the search space; ``modules`` the module-name glob the
    search applied it to (None: the space named none, so the search used
    :func:`~autodropout.apply_pattern`'s defaults); ``map_size`` the (height, width), or
    (tokens, features), plane its ``max_drop`` bound was computed on (None: none given).
    """

    name: str
    modules: str | None = None
    map_size: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The file form: ``name``, and ``modules`` and ``map_size`` where set."""
        data: dict[str, Any] = {"name": self.name}
        if self.modules is not None:
            data["modules"] = self.modules
        if self.map_size is not None:
            data["map_size"] = list(self.map_size)
        return data


@dataclass(frozen=True)
class Pattern:
    """A learned (or hand-written) dropout pattern: one parameter set per site.

    ``kind`` is ``"conv"`` (tiled rectangles on (N, C, H, W) activations) or ``"sequence"``
    (spans on (N, T, C) activations and attention heads). ``sites`` holds one read-only
    mapping per site, with exactly the fields of :data:`~autodropout.patterns.fields.SITE_FIELDS`.
    ``space`` names the search space it came from and ``placement`` holds one
    :class:`SitePlacement` per site, as that space gave them (None: unknown); both are
    metadata, not part of the identity, and :func:`~autodropout.apply_pattern` applies a
    conv pattern by its placement's globs where they fit the model.

    The identity is :attr:`hash`, the SHA-256 of the canonical JSON of ``kind`` and ``sites``,
    so the same parameters always give the same hash whichever space or file they came from.
    """

    kind: str
    sites: tuple[MappingProxyType, ...]
    space: str | None = field(default=None, compare=False)
    placement: tuple[SitePlacement, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        kind = check_kind(self.kind)
        if isinstance(self.sites, (str, bytes, dict)) or not hasattr(self.sites, "__iter__"):
            raise PatternError("sites: must be a list of site parameter mappings")
        sites = tuple(
            MappingProxyType(check_site(kind, _plain(site), f"sites[{i}]"))
            for i, site in enumerate(self.sites)
        )
        if not sites:
            raise PatternError("sites: must hold at least one site")
        if self.space is not None and not isinstance(self.space, str):
            raise PatternError(f"space: must be a string, got {self.space!r}")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "placement", _check_placement(self.placement, len(sites)))

    # identity -----------------------------------------------------------------------------
    @property
    def hash(self) -> str:
        identity = {"kind": self.kind, "sites": [_plain(site) for site in self.sites]}
        return hashlib.sha256(_canonical(identity).encode("ascii")).hexdigest()

    def __hash__(self) -> int:
        return hash(self.hash)

    def check_hash(self, claimed: Any) -> None:
        """Refuse a file whose ``hash`` field does not match its content (an exported file
        that was edited by hand or corrupted)."""
        if not isinstance(claimed, str) or len(claimed) != 64 or claimed.strip("0123456789abcdef"):
            raise PatternError(f"hash: must be 64 lowercase hex digits, got {claimed!r}")
        if claimed != self.hash:
            raise PatternError(
                f"hash: {claimed[:12]}... does not match the content ({self.hash[:12]}...): "
                "the file was edited or corrupted"
            )

    def __reduce__(self):
        return (type(self),
                (self.kind, [_plain(site) for site in self.sites], self.space, self.placement))

    def __len__(self) -> int:
        return len(self.sites)

    # dict / JSON / YAML -------------------------------------------------------------------
    def to_dict(self, with_hash: bool = False) -> dict[str, Any]:
        """The pattern as plain data; ``with_hash`` adds the ``hash`` that guards exported
        files against edits (it is checked whenever such a file is read)."""
        data: dict[str, Any] = {
            "format": FORMAT if self.placement else FORMAT_V1,
            "kind": self.kind,
            "sites": [_plain(site) for site in self.sites],
        }
        if self.space is not None:
            data["space"] = self.space
        if self.placement:
            data["placement"] = [place.to_dict() for place in self.placement]
        if with_hash:
            data["hash"] = self.hash
        return data

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, shortest round-trip float repr."""
        return _canonical(self.to_dict())

    def to_yaml(self, with_hash: bool = False) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(with_hash), sort_keys=True, default_flow_style=False)

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Pattern:
        prefix = f"{source}: " if source else ""
        try:
            if not isinstance(data, dict):
                raise PatternError("a pattern must be a mapping with kind and sites")
            unknown = sorted(set(data) - set(_TOP_LEVEL))
            if unknown:
                raise PatternError(f"{unknown[0]}: unknown field")
            version = data.get("format", FORMAT)
            if version not in READABLE_FORMATS:
                raise PatternError(f"format: unsupported {version!r} (must be one of "
                                   f"[{', '.join(READABLE_FORMATS)}])")
            if "placement" in data and version == FORMAT_V1:
                raise PatternError(f"placement: needs format {FORMAT!r}, the file says {version!r}")
            if "kind" not in data:
                raise PatternError("kind: missing")
            if "sites" not in data:
                raise PatternError("sites: missing")
            pattern = cls(kind=data["kind"], sites=data["sites"], space=data.get("space"),
                          placement=data.get("placement"))
            if "hash" in data:
                pattern.check_hash(data["hash"])
            return pattern
        except PatternError as error:
            raise PatternError(f"{prefix}{error}") from None

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> Pattern:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            where = f"{source}: " if source else ""
            raise PatternError(f"{where}line {error.lineno}: invalid JSON ({error.msg})") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_yaml(cls, text: str, source: str | None = None) -> Pattern:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            where = f"{source}: " if source else ""
            mark = getattr(error, "problem_mark", None)
            line = f"line {mark.line + 1}: " if mark is not None else ""
            raise PatternError(f"{where}{line}invalid YAML ({getattr(error, 'problem', error)})") from None
        return cls.from_dict(data, source)

    # files --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Pattern:
        """Read a pattern from a ``.json`` or ``.yaml``/``.yml`` file (with or without the
        ``hash`` of an exported file); any failure names the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise PatternError(f"{path}: cannot read ({error.strerror})") from None
        except UnicodeDecodeError:
            raise PatternError(f"{path}: not a UTF-8 text file") from None
        if path.suffix.lower() in YAML_SUFFIXES:
            return cls.from_yaml(text, str(path))
        return cls.from_json(text, str(path))

    def save(self, path: str | Path) -> Path:
        """Write the pattern as JSON or YAML by the file suffix (atomically)."""
        yaml_file = Path(path).suffix.lower() in YAML_SUFFIXES
        return write_text_atomic(path, self.to_yaml() if yaml_file else self.to_json() + "\n")

    def __repr__(self) -> str:
        space = f", space={self.space!r}" if self.space else ""
        return f"Pattern(kind={self.kind!r}, sites={len(self.sites)}{space}, hash={self.hash[:12]})"


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _check_placement(value: Any, count: int) -> tuple[SitePlacement, ...] | None:
    """``placement`` as one checked :class:`SitePlacement` per site (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise PatternError(f"placement: must be a list with one entry per site, got {value!r}")
    places = tuple(
        _check_place(asdict(item) if isinstance(item, SitePlacement) else item,
                     f"placement[{index}]")
        for index, item in enumerate(value)
    )
    if len(places) != count:
        raise PatternError(f"placement: must have one entry per site ({count}), got {len(places)}")
    names = [place.name for place in places]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        raise PatternError(f"placement: site name {repeated!r} is given twice")
    return places


def _check_place(raw: Any, where: str) -> SitePlacement:
    if not isinstance(raw, Mapping):
        raise PatternError(f"{where}: must be a mapping of {', '.join(_PLACEMENT_KEYS)}, "
                           f"got {raw!r}")
    unknown = sorted(set(raw) - set(_PLACEMENT_KEYS))
    if unknown:
        raise PatternError(f"{where}.{unknown[0]}: unknown field (must be one of "
                           f"[{', '.join(_PLACEMENT_KEYS)}])")
    if "name" not in raw:
        raise PatternError(f"{where}.name: missing")
    modules, map_size = raw.get("modules"), raw.get("map_size")
    return SitePlacement(
        _check_text(raw["name"], f"{where}.name"),
        None if modules is None else _check_text(modules, f"{where}.modules"),
        None if map_size is None else _check_map_size(map_size, f"{where}.map_size"),
    )


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PatternError(f"{where}: must be a non-empty string, got {value!r}")
    return value


def _check_map_size(value: Any, where: str) -> tuple[int, int]:
    """``28`` or ``[28, 28]`` as ``(28, 28)``."""
    pair = value if isinstance(value, (list, tuple)) else [value, value]
    try:
        height, width = (check_int(side, where, low=1) for side in pair)
    except ValueError:
        raise PatternError(f"{where}: must be a positive integer or a list of two, "
                           f"got {value!r}") from None
    return height, width


def _plain(site: Any) -> Any:
    """A site mapping as a plain dict of JSON types (tuples become lists)."""
    if not isinstance(site, (dict, MappingProxyType)):
        return site
    return {key: list(value) if isinstance(value, tuple) else value for key, value in site.items()}
