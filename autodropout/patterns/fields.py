"""The decisions a pattern site is made of, with their types and legal ranges.

One table serves both the :class:`~autodropout.patterns.Pattern` loader and the search-space
loader, so a value a space may offer is exactly a value a pattern may hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autodropout.errors import BadInput
from autodropout.validation import check_bool, check_int, check_real

CONV = "conv"
SEQUENCE = "sequence"
KINDS = (CONV, SEQUENCE)

FILL = "fill"
"""``repeat: fill`` tiles until the whole axis is covered."""

SEQUENCE_AXES = ("tokens", "features", "both")
SUBLAYERS = ("embedding", "attention_probs", "attention_output", "ffn_hidden", "ffn_output")


class PatternError(BadInput):
    """A pattern (or a space value) that is malformed; the message names the field."""


@dataclass(frozen=True)
class Field:
    """One decision of a site: its name, type and legal range.

    ``type`` is one of ``int``, ``number``, ``bool``, ``choice``, ``repeat`` (a positive int
    or ``"fill"``) and ``subset`` (a non-empty list drawn from ``choices``).
    """

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    doc: str = ""
    default: Any = None
    """Not None: the field may be left out, and a site holding the default leaves it out
    of its canonical form (so patterns written before the field existed keep their JSON
    and hash)."""
    low_open: bool = False

    def check(self, value: Any, where: str) -> Any:
        """Return ``value`` in canonical form or raise :class:`PatternError` naming ``where``.

        Messages read ``WHERE.NAME: must be WHAT, got VALUE``: the location prefix, then the
        shared shape of :mod:`autodropout.validation`.
        """
        checker = getattr(self, f"_check_{self.type}")
        return checker(value, f"{where}{self.name}")

    def _check_int(self, value: Any, where: str) -> int:
        return check_int(value, f"{where}:", low=self.low, high=self.high, error=PatternError)

    def _check_number(self, value: Any, where: str) -> float:
        return check_real(value, f"{where}:", low=self.low, high=self.high,
                          low_open=self.low_open, error=PatternError)

    def _check_bool(self, value: Any, where: str) -> bool:
        return check_bool(value, f"{where}:", error=PatternError)

    def _check_choice(self, value: Any, where: str) -> str:
        if value not in self.choices or not isinstance(value, str):
            raise PatternError(f"{where}: must be one of {', '.join(self.choices)}; got {value!r}")
        return value

    def _check_repeat(self, value: Any, where: str) -> int | str:
        if value == FILL and isinstance(value, str):
            return FILL
        try:
            return check_int(value, f"{where}:", low=1)
        except ValueError:
            raise PatternError(
                f"{where}: must be a positive integer or 'fill', got {value!r}"
            ) from None

    def _check_subset(self, value: Any, where: str) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            raise PatternError(f"{where}: must be a non-empty list of {', '.join(self.choices)}")
        for item in value:
            if item not in self.choices:
                raise PatternError(
                    f"{where}: {item!r} is not one of {', '.join(self.choices)}"
                )
        if len(set(value)) != len(value):
            raise PatternError(f"{where}: lists {value!r} with duplicates")
        return tuple(sorted(value, key=self.choices.index))


CONV_FIELDS: tuple[Field, ...] = (
    Field("size_h", "int", low=1, doc="height of the dropped rectangle, in pixels"),
    Field("size_w", "int", low=1, doc="width of the dropped rectangle, in pixels"),
    Field("stride", "int", low=1, doc="distance between the origins of neighbouring tiles"),
    Field("repeat", "repeat", doc="tiles per axis, or 'fill' to tile the whole map"),
    Field("rotate", "number", low=-180, high=180, doc="rotation about the map centre, degrees"),
    Field("shear_x", "number", low=-1, high=1, doc="horizontal shear factor about the centre"),
    Field("shear_y", "number", low=-1, high=1, doc="vertical shear factor about the centre"),
    Field("share_c", "bool", doc="one mask for all channels (true) or one per channel"),
    Field("residual", "bool", doc="also apply the mask to the residual (shortcut) branch"),
    Field("p_apply", "number", low=0, high=1, low_open=True, default=1.0,
          doc="probability, per example and per channel (per example if share_c), that the "
              "site's pattern is applied at all"),
    Field("p_tile", "number", low=0, high=1, low_open=True, default=1.0,
          doc="probability that each cell of the tiling (the pixels whose last tile start is "
              "the same on both axes: the tile itself when size <= stride) is dropped, "
              "independently per cell and instance"),
)

SEQUENCE_FIELDS: tuple[Field, ...] = (
    Field("size", "int", low=1, doc="length of a dropped span (tokens or features)"),
    Field("stride", "int", low=1, doc="distance between the starts of neighbouring spans"),
    Field("repeat", "repeat", doc="spans per sequence, or 'fill' to tile the whole axis"),
    Field("axis", "choice", choices=SEQUENCE_AXES, doc="which axis the spans run along"),
    Field("share", "bool", doc="one mask shared across heads/features (true) or one each"),
    Field("apply_to", "subset", choices=SUBLAYERS, doc="the Transformer sub-layers it acts on"),
)

SITE_FIELDS: dict[str, tuple[Field, ...]] = {CONV: CONV_FIELDS, SEQUENCE: SEQUENCE_FIELDS}

DEFAULTS: dict[str, Any] = {field.name: field.default for fields in SITE_FIELDS.values()
                            for field in fields if field.default is not None}
"""Fields that may be left out, and the value a site then holds."""

_NO_DEFAULT = object()


def check_kind(kind: Any, where: str = "kind") -> str:
    if kind not in KINDS or not isinstance(kind, str):
        raise PatternError(f"{where}: must be one of {', '.join(KINDS)}; got {kind!r}")
    return kind


def check_site(kind: str, raw: Any, where: str) -> dict[str, Any]:
    """Validate one site's parameter mapping and return it in canonical form."""
    if not isinstance(raw, dict):
        raise PatternError(f"{where}: must be a mapping of site parameters, got {raw!r}")
    fields = SITE_FIELDS[kind]
    names = {field.name for field in fields}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise PatternError(f"{where}.{unknown[0]}: unknown field for a {kind} site")
    missing = [field.name for field in fields if field.name not in raw and field.default is None]
    if missing:
        raise PatternError(f"{where}.{missing[0]}: missing")
    checked = {field.name: field.check(raw[field.name], f"{where}.")
               for field in fields if field.name in raw}
    return {name: value for name, value in checked.items()
            if DEFAULTS.get(name, _NO_DEFAULT) != value}


def site_value(site: Any, name: str) -> Any:
    """A field of a canonical site mapping, the field's default where the site leaves it out."""
    return site[name] if name in site else DEFAULTS[name]
