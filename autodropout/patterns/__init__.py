"""Structured dropout patterns (AutoDropout): the ``Pattern`` value and its site fields."""

from .fields import CONV, FILL, SEQUENCE, SUBLAYERS, PatternError
from .pattern import Pattern

__all__ = ["CONV", "FILL", "SEQUENCE", "SUBLAYERS", "Pattern", "PatternError"]
