"""The dropout layer family. Each module holds one family; exports are listed here."""

from .base import DropoutLayer, KeepMaskDropout, check_probability

__all__ = ["DropoutLayer", "KeepMaskDropout", "check_probability"]
