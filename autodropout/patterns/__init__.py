"""Structured dropout patterns (AutoDropout): the ``Pattern`` value, its site fields, pattern
files, the ``PatternDropout`` layer, ``apply_pattern`` and ``render``.

The value, its fields and its files need no torch; the layer, ``apply_pattern`` and
``render`` load it on first use.
"""

from autodropout._lazy import lazy_exports

from .fields import CONV, FILL, SEQUENCE, SUBLAYERS, PatternError
from .pattern import Pattern

_EXPORTS = {
    "PatternHandle": ".apply",
    "apply_pattern": ".apply",
    "strip_pattern": ".apply",
    "PatternDropout": ".module",
    "render": ".figures",
}

__all__ = ["CONV", "FILL", "SEQUENCE", "SUBLAYERS", "Pattern", "PatternError", *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
