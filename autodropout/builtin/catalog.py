"""``catalog.json``, the provenance of the built-in patterns: its format and entry checks.

The catalog is ``{"format": "autodropout.builtins/1", "patterns": [ENTRY, ...]}`` with the
entries sorted by name. Each entry says where its pattern came from:

=================  ==========================================================================
``name``           lowercase letters, digits and ``-``; the ref is ``builtin:NAME``
``version``        a positive integer, raised whenever the pattern itself changes
``file``           ``NAME.json``, the pattern file beside the catalog
``hash``           the pattern's content hash, which that file must hold
``summary``        one line
``space``          the search space it was found in, e.g. ``convnet``
``dataset``        the dataset it was found on, e.g. ``fashion-mnist``
``model``          the child model it was found on, e.g. ``wrn``, built with ``model_args``
``model_args``     a mapping, e.g. ``{"width": 1}``
``map_shape``      one example's activation shape at its first site: [C, H, W] or [T, C]
``search``         ``{name, controller, seed, trials}`` of the search that found it
``validation``     ``{metric, value}``: the validation score that chose it
``test``           ``{metric, seeds, mean, std, best_fixed, vs_none, vs_best_fixed}``: the
                   test-split score over ``seeds`` (a list), and the paired differences pattern
                   minus no dropout and pattern minus ``best_fixed`` (the best fixed baseline's
                   ref), each ``{mean, low, high}`` with a 95 % t-interval, in the metric's
                   units; null where not measured (the score's four all or none)
``report``         the repository-relative path of the report it came from
=================  ==========================================================================

Every check raises :class:`~autodropout.errors.BadInput` naming the entry and the field.
Nothing here imports more than the standard library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from autodropout.errors import BadInput
from autodropout.validation import check_int, check_real

FORMAT = "autodropout.builtins/1"
ENTRY_KEYS = ("name", "version", "file", "hash", "summary", "space", "dataset", "model",
              "model_args", "map_shape", "search", "validation", "test", "report")
SEARCH_KEYS = ("name", "controller", "seed", "trials")
VALIDATION_KEYS = ("metric", "value")
TEST_KEYS = ("metric", "seeds", "mean", "std", "best_fixed", "vs_none", "vs_best_fixed")
SCORE_KEYS = TEST_KEYS[:4]
INTERVAL_KEYS = ("mean", "low", "high")
NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
HASH = re.compile(r"[0-9a-f]{64}")


def check_entry(raw: Any, where: str = "entry") -> dict[str, Any]:
    """A checked copy of the catalog entry ``raw``; ``where`` starts each error message."""
    entry = _fields(raw, ENTRY_KEYS, where)
    name = entry["name"]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadInput(f"{where}.name: must be lowercase letters, digits and '-', got {name!r}")
    where = f"{where} {name}"
    if entry["file"] != f"{name}.json":
        raise BadInput(f"{where}.file: must be {name + '.json'!r}, got {entry['file']!r}")
    if not isinstance(entry["hash"], str) or not HASH.fullmatch(entry["hash"]):
        raise BadInput(f"{where}.hash: must be 64 lowercase hex digits, got {entry['hash']!r}")
    if "\n" in _text(entry["summary"], f"{where}.summary"):
        raise BadInput(f"{where}.summary: must be one line, got {entry['summary']!r}")
    for key in ("space", "dataset", "model", "report"):
        _text(entry[key], f"{where}.{key}")
    return {
        **entry,
        "version": check_int(entry["version"], f"{where}.version", low=1, error=BadInput),
        "model_args": _model_args(entry["model_args"], f"{where}.model_args"),
        "map_shape": _positive_ints(entry["map_shape"], f"{where}.map_shape"),
        "search": _search(entry["search"], f"{where}.search"),
        "validation": _validation(entry["validation"], f"{where}.validation"),
        "test": _test(entry["test"], f"{where}.test"),
    }


def parse_catalog(text: str, source: str) -> list[dict[str, Any]]:
    """The checked entries of the catalog file text ``text`` read from ``source``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadInput(f"{source}: line {error.lineno}: invalid JSON ({error.msg})") from None
    catalog = _fields(data, ("format", "patterns"), source)
    if catalog["format"] != FORMAT:
        raise BadInput(f"{source}: format must be {FORMAT!r}, got {catalog['format']!r}")
    if not isinstance(catalog["patterns"], list):
        raise BadInput(f"{source}: patterns must be a list of entries")
    entries = [check_entry(raw, f"{source}: patterns[{index}]")
               for index, raw in enumerate(catalog["patterns"])]
    names = [entry["name"] for entry in entries]
    if names != sorted(set(names)):
        raise BadInput(f"{source}: patterns must be sorted by name, each name once, got {names}")
    return entries


def dump_catalog(entries: Iterable[Mapping[str, Any]]) -> str:
    """The catalog file text of ``entries``, sorted by name."""
    ordered = sorted(entries, key=lambda entry: entry["name"])
    return json.dumps({"format": FORMAT, "patterns": ordered}, indent=2, sort_keys=True,
                      allow_nan=False) + "\n"


def _fields(raw: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """``raw`` as a dict, which must have exactly ``keys``."""
    if not isinstance(raw, Mapping):
        raise BadInput(f"{where}: must be a mapping of {', '.join(keys)}, got {raw!r}")
    missing = [key for key in keys if key not in raw]
    if missing:
        raise BadInput(f"{where}.{missing[0]}: missing")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise BadInput(f"{where}.{unknown[0]}: unknown field (must be one of "
                       f"[{', '.join(keys)}])")
    return dict(raw)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{where}: must be a non-empty string, got {value!r}")
    return value


def _model_args(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise BadInput(f"{where}: must be a mapping of argument names to values, got {value!r}")
    return dict(value)


def _positive_ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise BadInput(f"{where}: must be a list of positive integers, got {value!r}")
    return [check_int(side, where, low=1, error=BadInput) for side in value]


def _search(value: Any, where: str) -> dict[str, Any]:
    search = _fields(value, SEARCH_KEYS, where)
    return {"name": _text(search["name"], f"{where}.name"),
            "controller": _text(search["controller"], f"{where}.controller"),
            "seed": check_int(search["seed"], f"{where}.seed", low=0, error=BadInput),
            "trials": check_int(search["trials"], f"{where}.trials", low=1, error=BadInput)}


def _validation(value: Any, where: str) -> dict[str, Any]:
    validation = _fields(value, VALIDATION_KEYS, where)
    return {"metric": _text(validation["metric"], f"{where}.metric"),
            "value": _real(validation["value"], f"{where}.value")}


def _test(value: Any, where: str) -> dict[str, Any]:
    test = _fields(value, TEST_KEYS, where)
    checks: dict[str, Callable[[Any, str], Any]] = {
        "metric": _text, "seeds": _seeds, "mean": _real, "std": _spread, "best_fixed": _text,
        "vs_none": _interval, "vs_best_fixed": _interval}
    checked = {key: None if test[key] is None else check(test[key], f"{where}.{key}")
               for key, check in checks.items()}
    score = [checked[key] is None for key in SCORE_KEYS]
    if any(score) and not all(score):
        raise BadInput(f"{where}: {', '.join(SCORE_KEYS)} must all be given, or all be null "
                       "(not measured)")
    if (checked["best_fixed"] is None) != (checked["vs_best_fixed"] is None):
        raise BadInput(f"{where}.best_fixed: must name the baseline of vs_best_fixed, and be "
                       "null only when vs_best_fixed is")
    return checked


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise BadInput(f"{where}: must be a list of seeds (non-negative integers), got {value!r}")
    return [check_int(seed, where, low=0, error=BadInput) for seed in value]


def _real(value: Any, where: str) -> float:
    return check_real(value, where, error=BadInput)


def _spread(value: Any, where: str) -> float:
    return check_real(value, where, low=0.0, error=BadInput)


def _interval(value: Any, where: str) -> dict[str, float]:
    interval = {key: _real(raw, f"{where}.{key}")
                for key, raw in _fields(value, INTERVAL_KEYS, where).items()}
    if not interval["low"] <= interval["mean"] <= interval["high"]:
        raise BadInput(f"{where}: must hold low <= mean <= high, got {interval}")
    return interval
