"""Declarative AutoDropout search spaces: YAML files shipped with the package and their loader.

A space lists, per dropout site, the choices for every decision of a pattern; the loader
validates it and maps controller token indices to a :class:`autodropout.Pattern` and back::

    space = search_spaces.load("convnet")          # or a path to your own YAML file
    pattern = space.decode([0] * len(space.decisions))
    assert space.encode(pattern) == [0] * len(space.decisions)
"""

from .loader import SpaceError, available, load, parse
from .space import Decision, SearchSpace, SiteSpec

__all__ = ["Decision", "SearchSpace", "SiteSpec", "SpaceError", "available", "load", "parse"]
