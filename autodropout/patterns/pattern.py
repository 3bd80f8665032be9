"""``Pattern``: an immutable dropout pattern with a canonical JSON form and a content hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from autodropout.atomic import write_text_atomic

from .fields import PatternError, check_kind, check_site

YAML_SUFFIXES = (".yaml", ".yml")

FORMAT = "autodropout.pattern/1"
_TOP_LEVEL = ("format", "hash", "kind", "sites", "space")


@dataclass(frozen=True)
class Pattern:
    """A learned (or hand-written) dropout pattern: one parameter set per site.

    ``kind`` is ``"conv"`` (tiled rectangles on (N, C, H, W) activations) or ``"sequence"``
    (spans on (N, T, C) activations and attention heads). ``sites`` holds one read-only
    mapping per site, with exactly the fields of :data:`~autodropout.patterns.fields.SITE_FIELDS`.
    ``space`` names the search space it came from (metadata: not part of the identity).

    The identity is :attr:`hash`, the SHA-256 of the canonical JSON of ``kind`` and ``sites``,
    so the same parameters always give the same hash whichever space or file they came from.
    """

    kind: str
    sites: tuple[MappingProxyType, ...]
    space: str | None = field(default=None, compare=False)

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
        return (type(self), (self.kind, [_plain(site) for site in self.sites], self.space))

    def __len__(self) -> int:
        return len(self.sites)

    # dict / JSON / YAML -------------------------------------------------------------------
    def to_dict(self, with_hash: bool = False) -> dict[str, Any]:
        """The pattern as plain data; ``with_hash`` adds the ``hash`` that guards exported
        files against edits (it is checked whenever such a file is read)."""
        data: dict[str, Any] = {
            "format": FORMAT,
            "kind": self.kind,
            "sites": [_plain(site) for site in self.sites],
        }
        if self.space is not None:
            data["space"] = self.space
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
            if data.get("format", FORMAT) != FORMAT:
                raise PatternError(f"format: unsupported {data['format']!r} (expected {FORMAT!r})")
            if "kind" not in data:
                raise PatternError("kind: missing")
            if "sites" not in data:
                raise PatternError("sites: missing")
            pattern = cls(kind=data["kind"], sites=data["sites"], space=data.get("space"))
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



def _plain(site: Any) -> Any:
    """A site mapping as a plain dict of JSON types (tuples become lists)."""
    if not isinstance(site, (dict, MappingProxyType)):
        return site
    return {key: list(value) if isinstance(value, tuple) else value for key, value in site.items()}
