"""The dropout layer family. Each module holds one family; exports are listed here.

``check_probability`` is :func:`autodropout.validation.check_probability`, re-exported.
"""

from autodropout.validation import check_probability

from .adaptive import Jumpout, RelevanceDropout, Standout
from .base import DropoutLayer, KeepMaskDropout
from .connect import DropConnect
from .mc import mc_dropout, mc_predict
from .schedules import CurriculumDropout, DropoutScheduler
from .standard import (
    AlphaDropout,
    Dropout,
    FeatureAlphaDropout,
    GaussianDropout,
    LockedDropout,
    SpatialDropout,
)
from .structured import DropBlock2d, DropPath, drop_path_rates
from .variational import (
    ConcreteDropout,
    SparseVariationalDropout,
    VariationalDropout,
    variational_kl,
)

__all__ = ["DropoutLayer", "KeepMaskDropout", "check_probability"]
__all__ += ["CurriculumDropout", "DropoutScheduler", "mc_dropout", "mc_predict"]
__all__ += ["Jumpout", "RelevanceDropout", "Standout"]
__all__ += ["ConcreteDropout", "SparseVariationalDropout", "VariationalDropout", "variational_kl"]
__all__ += ["DropBlock2d", "DropPath", "drop_path_rates"]
__all__ += ["AlphaDropout", "Dropout", "FeatureAlphaDropout", "GaussianDropout"]
__all__ += ["LockedDropout", "SpatialDropout", "DropConnect"]
