"""autodropout: learned dropout patterns and the family of dropout layers for PyTorch.

``import autodropout as ad`` gives the layers, patterns and the helpers that apply and
load patterns. It imports torch only: ray, sqlalchemy and yaml are imported lazily by
the code that needs them.
"""

from .layers import *  # noqa: F403
from .layers import __all__ as _layer_names
from .load import load_pattern
from .patterns import (
    Pattern,
    PatternDropout,
    PatternError,
    PatternHandle,
    apply_pattern,
    render,
    strip_pattern,
)

__version__ = "0.1.0"

__all__ = [
    *_layer_names,
    "Pattern",
    "PatternDropout",
    "PatternError",
    "render",
    "PatternHandle",
    "apply_pattern",
    "load_pattern",
    "strip_pattern",
    "__version__",
]
