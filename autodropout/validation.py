"""Argument checks shared by every package: one rule each for an integer, a real, a flag, a
probability and a choice.

Each check returns the value in canonical form (``int``, ``float``, ``bool``) or raises
``error`` (``ValueError`` unless the caller passes another, e.g.
:class:`~autodropout.errors.BadInput`) with one message shape: ``"NAME must be WHAT, got
VALUE"``. ``bool`` is never accepted as a number, and reals must be finite. This module
imports nothing heavy, so the store and the CLI use it without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any


def _fail(error: type[Exception], name: str, what: str, value: Any) -> Exception:
    return error(f"{name} must be {what}, got {value!r}")


def _bounds(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" <= {high:g}"
    return ""


def is_real(value: Any, finite: bool = False) -> bool:
    """Whether ``value`` is a real number (never a ``bool``), and finite if ``finite``: the
    predicate behind the checks, for code that skips rather than refuses a value."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    return math.isfinite(value) if finite else True


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None,
              error: type[Exception] = ValueError) -> int:
    """``value`` as an ``int`` in ``[low, high]`` (either end optional)."""
    if low == 1 and high is None:
        what = "a positive integer"
    elif low == 0 and high is None:
        what = "a non-negative integer"
    else:
        what = "an integer" + _bounds(low, high)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _fail(error, name, what, value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(error, name, what, value)
    return int(value)


def check_real(value: Any, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, error: type[Exception] = ValueError) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if low == 0 and low_open and high is None:
        what = "a positive finite number"
    else:
        what = "a finite number" + _bounds(low, high, low_open)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise _fail(error, name, what, value)
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        raise _fail(error, name, what, value)
    return float(value) + 0.0  # folds -0.0 into 0.0


def check_probability(value: Any, name: str = "p", *,
                      error: type[Exception] = ValueError) -> float:
    """``value`` as a ``float`` in [0, 1]: a drop probability unless ``name`` says otherwise."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise _fail(error, name, "a probability in [0, 1]", value)
    return float(value)


def check_bool(value: Any, name: str, *, error: type[Exception] = ValueError) -> bool:
    """``value`` itself, which must be ``True`` or ``False`` (not 0/1)."""
    if not isinstance(value, bool):
        raise _fail(error, name, "true or false", value)
    return value


def one_of(name: str, choices: Iterable[str], value: Any) -> str:
    """The one message for a value outside a fixed set: ``NAME must be one of [a, b], got x``."""
    return f"{name} must be one of [{', '.join(choices)}], got {value!r}"


def check_choice(value: Any, choices: Iterable[str], name: str, *,
                 error: type[Exception] = ValueError) -> str:
    """``value``, which must be one of the strings ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise error(one_of(name, choices, value))
    return value
