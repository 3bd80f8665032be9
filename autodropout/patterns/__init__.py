"""Structured dropout patterns (AutoDropout): the ``Pattern`` value, its site fields, the
``PatternDropout`` layer and ``render``."""

from .apply import PatternHandle, apply_pattern, strip_pattern
from .fields import CONV, FILL, SEQUENCE, SUBLAYERS, PatternError
from .module import PatternDropout
from .pattern import Pattern
from .render import render

__all__ = [
    "CONV",
    "FILL",
    "SEQUENCE",
    "SUBLAYERS",
    "Pattern",
    "PatternDropout",
    "PatternError",
    "PatternHandle",
    "apply_pattern",
    "strip_pattern",
    "render",
]
