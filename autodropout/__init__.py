"""autodropout: learned dropout patterns and the family of dropout layers for PyTorch.

``import autodropout as ad`` gives the layers, patterns, the helpers that apply and load
patterns, and ``builtin_patterns()``, the searched patterns shipped with the package. Each
name is imported on first use (PEP 562), so ``import autodropout`` itself loads neither
torch nor anything else heavy: the layers and ``apply_pattern`` load torch,
``load_pattern`` on a store reference loads SQLAlchemy; ray is never imported here.
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

LAYERS = (
    "AlphaDropout", "ConcreteDropout", "CurriculumDropout", "DropBlock2d", "DropConnect",
    "DropPath", "Dropout", "DropoutLayer", "DropoutScheduler", "FeatureAlphaDropout",
    "GaussianDropout", "Jumpout", "KeepMaskDropout", "LockedDropout", "RelevanceDropout",
    "SparseVariationalDropout", "SpatialDropout", "Standout", "VariationalDropout",
    "check_probability", "drop_path_rates", "mc_dropout", "mc_predict", "variational_kl",
)
"""The names of :mod:`autodropout.layers`, re-exported here (a test keeps the two equal)."""

_EXPORTS = {
    **dict.fromkeys(LAYERS, ".layers"),
    **dict.fromkeys(("Pattern", "PatternDropout", "PatternError", "PatternHandle",
                     "apply_pattern", "strip_pattern"), ".patterns"),
    "render": ".patterns.figures",
    "load_pattern": ".load",
    "builtin_patterns": ".builtin",
}

__all__ = [*_EXPORTS, "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
