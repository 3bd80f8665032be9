"""One registry shape for every "name -> implementation" table of the project.

Controllers, child models, datasets and baseline families are each a :class:`Registry`:
names map to ``"module:attribute"`` strings that are imported on first use (so listing the
names, e.g. for ``--help``, loads nothing), and an unknown name is one
:class:`~autodropout.errors.BadInput` error: ``"FIELD must be one of [a, b], got 'x'"``.
This is Ray Tune's ``tune.search`` registry pattern, without a module per entry.

    >>> MODELS = Registry("--model", {"wrn": "workers.models:WideResNet"})
    >>> MODELS.names()
    ('wrn',)
    >>> MODELS.get("wrn")          # imports workers.models now
    <class 'workers.models.WideResNet'>
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import BadInput
from .validation import one_of


class Registry:
    """Names -> lazily imported implementations; ``aliases`` map other spellings to names.

    ``registry[name]`` and :meth:`get` import and return the implementation; ``name in
    registry`` accepts aliases; iteration and :meth:`names` give the canonical names.
    """

    def __init__(self, field: str, targets: Mapping[str, str],
                 aliases: Mapping[str, str] | None = None) -> None:
        self.field = field
        self._targets = dict(targets)
        self._aliases = dict(aliases or {})
        self._loaded: dict[str, Any] = {}

    def names(self) -> tuple[str, ...]:
        return tuple(self._targets)

    def canonical(self, name: Any, field: str | None = None) -> str:
        """The canonical name for ``name`` (itself or what its alias points to), or the error."""
        name = self._aliases.get(name, name) if isinstance(name, str) else name
        if not isinstance(name, str) or name not in self._targets:
            raise BadInput(one_of(field or self.field, self.names(), name))
        return name

    def get(self, name: Any, field: str | None = None) -> Any:
        """The implementation of ``name``, imported on first use; ``field`` names the input in
        the error (default: the registry's own field)."""
        name = self.canonical(name, field)
        if name not in self._loaded:
            module, _, attribute = self._targets[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(name, name) in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"Registry({self.field!r}, [{', '.join(self._targets)}])"
