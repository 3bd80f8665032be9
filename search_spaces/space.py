"""``SearchSpace``: the ordered decisions a controller samples, and token <-> Pattern mapping."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from autodropout.patterns import Pattern
from autodropout.patterns.fields import SITE_FIELDS, PatternError, site_value
from autodropout.patterns.pattern import SitePlacement


@dataclass(frozen=True)
class Decision:
    """One token the controller emits: a choice among ``choices`` for ``site``'s ``name``."""

    site: int
    name: str
    choices: tuple[Any, ...]

    @property
    def key(self) -> str:
        return f"site{self.site}.{self.name}"


@dataclass(frozen=True)
class SiteSpec:
    """One site of a space: its display name, the child-model modules it goes to, and the
    choices of every field (a single choice is a constant, not a controller decision), and
    the plane ``map_size`` its ``max_drop`` bound is computed on (None: the space's)."""

    name: str
    choices: Mapping[str, tuple[Any, ...]]
    modules: str | None = None
    map_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (see :func:`search_spaces.load`).

    ``decisions`` lists, site by site in field order, every field with more than one
    choice: that is the token sequence a controller samples. ``decode`` turns one index per
    decision into a :class:`~autodropout.Pattern` carrying the space's :attr:`placement`;
    ``encode`` is its inverse.

    ``max_drop`` (None: unbounded) is the largest expected fraction of a site's activations
    a pattern of the space may drop, on the site's ``map_size`` (else the space's
    ``map_size``, else a default: :mod:`search_spaces.bounds`); :attr:`choice_masks` holds
    the per-decision masks that keep sampling within it.
    """

    name: str
    kind: str
    sites: tuple[SiteSpec, ...]
    budget: Mapping[str, Any] = field(default_factory=dict)
    controller: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""
    yaml_text: str = ""
    max_drop: float | None = None
    map_size: tuple[int, int] | None = None

    @property
    def choice_masks(self):
        """:class:`search_spaces.bounds.ChoiceMasks` for ``max_drop`` (None without one),
        computed once per process and kept out of the (pickled) space."""
        from .bounds import choice_masks

        return choice_masks(self)

    def within_bound(self, pattern: Pattern) -> bool:
        """Whether every site of ``pattern`` drops at most ``max_drop`` (True without one)."""
        from .bounds import within

        return within(self, pattern)

    @cached_property
    def decisions(self) -> tuple[Decision, ...]:
        """The site fields with more than one choice, in decoding order (computed once)."""
        return tuple(
            Decision(index, f.name, site.choices[f.name])
            for index, site in enumerate(self.sites)
            for f in SITE_FIELDS[self.kind]
            if len(site.choices[f.name]) > 1
        )

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    @property
    def log10_size(self) -> float:
        """log10 of the number of distinct patterns in the space."""
        return sum(math.log10(len(d.choices)) for d in self.decisions)

    @property
    def bounded_log10_size(self) -> float:
        """log10 of the number of patterns within ``max_drop`` (``log10_size`` without one)."""
        if self.max_drop is None:
            return self.log10_size
        from .bounds import BOUND_FIELDS, TOLERANCE, site_table

        free = sum(math.log10(len(d.choices)) for d in self.decisions
                   if d.name not in BOUND_FIELDS[self.kind])
        return free + sum(math.log10(int((site_table(self, i) <= self.max_drop + TOLERANCE).sum()))
                          for i in range(self.num_sites))

    @property
    def site_modules(self) -> tuple[str | None, ...]:
        return tuple(site.modules for site in self.sites)

    @cached_property
    def placement(self) -> tuple[SitePlacement, ...]:
        """Each site's name, ``modules`` glob and ``map_size`` (else the space's): what the
        patterns :meth:`decode` gives carry, so an exported one is applied as searched."""
        return tuple(SitePlacement(site.name, site.modules, site.map_size or self.map_size)
                     for site in self.sites)

    def decode(self, indices: Sequence[int]) -> Pattern:
        decisions = self.decisions
        if len(indices) != len(decisions):
            raise ValueError(f"indices: expected {len(decisions)} tokens, got {len(indices)}")
        values = [{name: choices[0] for name, choices in site.choices.items()} for site in self.sites]
        for decision, index in zip(decisions, indices):
            if not 0 <= int(index) < len(decision.choices):
                raise ValueError(
                    f"indices: {decision.key} index {index} outside [0, {len(decision.choices)})"
                )
            values[decision.site][decision.name] = decision.choices[int(index)]
        return Pattern(self.kind, values, space=self.name, placement=self.placement)

    def encode(self, pattern: Pattern) -> list[int]:
        if pattern.kind != self.kind or len(pattern.sites) != len(self.sites):
            raise PatternError(
                f"pattern has {len(pattern.sites)} {pattern.kind} sites; space {self.name!r} "
                f"has {len(self.sites)} {self.kind} sites"
            )
        for index, site in enumerate(self.sites):
            for name, choices in site.choices.items():
                if site_value(pattern.sites[index], name) not in choices:
                    raise PatternError(
                        f"sites[{index}].{name}: {site_value(pattern.sites[index], name)!r} is not a choice "
                        f"of space {self.name!r}"
                    )
        return [d.choices.index(site_value(pattern.sites[d.site], d.name)) for d in self.decisions]
