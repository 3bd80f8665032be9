"""Wire a pattern into an existing model without editing its source: ``apply_pattern``.

Mechanism: a forward hook on every selected module replaces its output by the
pattern-dropped output. Hooks leave parameters, buffers and ``state_dict`` keys alone and
are traced by ``torch.compile``. Each :class:`PatternDropout` layer is registered as a child
of the module it hooks, named ``autodropout_<key>`` (``key`` numbers the patterns applied
to the model: ``0``, ``1``, ...), so ``model.train()``/``eval()``, ``.to()`` and ``print``
reach it. A child of the hooked module rather than one container on the model, because
``nn.Sequential`` runs every child it holds: a model that is a ``Sequential`` keeps working,
while a selected ``Sequential`` (or ``ModuleList``/``ModuleDict``) is refused; select its
last layer instead. The layers hold no tensors, so ``state_dict`` is unchanged. Each hook
acts only while its layer is in training mode: in eval every output is the model's own.
Hooks are callable objects (not closures), so ``copy.deepcopy`` of a patterned model
gives a patterned copy whose hooks drive the copy's layers. Module names starting with
``autodropout_`` are reserved.

Sites (``sites=``): a selector is a module-name glob (``fnmatch`` against
``named_modules()`` names), an ``nn.Module`` subclass, or a list of them (their union;
each must match something). Defaults: conv patterns hook every ``nn.BatchNorm2d`` (the
paper's placement; a model without one is a ``ValueError`` naming the normalisation
layers it has, modules whose type name holds ``Norm``, and how to target them); sequence
patterns hook the dropout slots of :data:`SEQUENCE_DEFAULT_SITES` (the project's GPT,
nanoGPT and Hugging Face GPT-2 names; a sub-layer none of whose defaults matches is a
``ValueError`` saying what to pass), and a sequence ``sites`` is a mapping from sub-layer
to selector that overrides those defaults. A hooked ``nn.Dropout`` keeps its own ``p`` and
the pattern acts on its output: build the model with ``dropout=0`` for the pattern alone.

Sites to modules (``handle.rule`` names the rule used, one of :data:`RULES`), with ``M``
the matched modules in ``named_modules()`` order and ``k`` the pattern's sites:

* conv, by placement (``sites=None``): a pattern whose ``placement`` gives every site a
  ``modules`` glob (an exported search result does, when its space's sites name modules)
  puts site ``i`` on every module glob ``i`` matches, exactly as the search did, provided
  every glob matches a module of this model. Otherwise (some site has no glob, or a glob
  matches nothing) the default mapping below is used and ``handle.placement_unused`` says
  why. Sequence patterns never use ``modules`` globs.
* conv, one to one: with ``k == len(M)`` site ``i`` goes to ``M[i]``; a single site is
  shared by every module (each gets its own layer, so masks are drawn independently).
* conv, by stages: otherwise, given ``example_input=``, the model runs once on it (eval
  mode, no grad; training flags restored, nothing else changes) and the matched modules
  are grouped into *stages*: runs of modules consecutive in forward order whose outputs
  have the same spatial size. With ``k`` stages, stage ``i`` gets site ``i``; with another
  number the ``ValueError`` lists the stages found (module names and map sizes). Without
  ``example_input`` the handle is returned at once and the stages are found the same way
  on the model's first forward (a forward pre-hook that removes itself, maps and installs
  the sites, then lets that call run with the pattern in place; a stage mismatch raises
  there, leaving no hook behind); until then ``handle.assignment`` is empty.
* conv, explicit: ``sites`` may map each site to its own selector
  (``{0: "group1.*.bn*", 1: "group2.*.bn*"}``): site ``i`` goes to every module selector
  ``i`` matches, as a search space's per-site ``modules:`` globs say. Keys may be ints,
  digit strings (``{"0": ...}``, as read from YAML or JSON) or the site names of the
  pattern's placement (``{"stage1": "layer1.*.bn*", ...}``). An explicit ``sites`` always
  wins over the placement.
* sequence: the same one-to-one/shared rule per sub-layer, between the sites whose
  ``apply_to`` holds the sub-layer (in pattern order) and the modules matched for it. So
  one site per block works (``n_layers`` sites with the same ``apply_to``), as does one
  site for the whole network. Sub-layers no site names are left alone.

The result is ``handle.assignment`` (hooked module name -> site index); ``str(handle)``
prints it by site (with the sites' names, where the placement has them) and the rule.

Residual branch (conv sites with ``residual=True``): a residual block is a module exposing
its residual branch as the attribute ``residual_site``, ``shortcut`` or ``downsample``
(the first present; torchvision's ``BasicBlock``/``Bottleneck`` and :class:`WideResNet`
blocks qualify), a module or ``None`` for the identity; or a module whose
:data:`IDENTITY_FLAG` ``use_res_connect`` is ``True`` (torchvision's MobileNetV2
``InvertedResidual``, which has an identity shortcut then and none when ``False``). The
block's *last* hooked site outside that branch (``bn2``/``bn3`` for torchvision; ``bn2`` of a pre-activation block,
whose output has the shape of the block output) draws one mask per block call, and the
same mask multiplies the residual branch's output. A module branch gets a forward hook.
A ``None`` branch is never replaced (that could change the block's code path, and so
what it computes even in eval): in training, a forward pre-hook on the block passes it
``x * mask`` instead of its input ``x``, and a forward pre-hook on every module inside the
block hands the original ``x`` back to whichever of them receives ``x * mask``, so the
main branch sees ``x`` and the identity that reaches the addition is ``x * mask`` (that
mask is drawn at block entry, with the input's shape). The
main branch must therefore start with a module call on ``x`` (a ``RuntimeError`` in
training says so when no module received it). If the branch output has another spatial
size, the mask is resampled to it by nearest neighbour; batch and channels must agree.
``residual`` of any other site (not last in a block, or in no block) has no effect. In
eval mode every hook is off: a pattern never changes what the model computes.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fields import CONV, SUBLAYERS
from .module import PatternDropout
from .pattern import Pattern

PREFIX = "autodropout_"
RESIDUAL_SLOTS = ("residual_site", "shortcut", "downsample")
IDENTITY_FLAG = "use_res_connect"
"""torchvision's ``InvertedResidual`` (MobileNetV2) flag: ``True`` adds an identity shortcut."""
SEQUENCE_DEFAULT_SITES: dict[str, tuple[str, ...]] = {
    "embedding": ("drop", "*.drop"),
    "attention_probs": ("*attn_dropout",),
    "attention_output": ("*resid_dropout",),
    "ffn_hidden": ("*hidden_dropout", "*mlp.act"),
    "ffn_output": ("*mlp.dropout",),
}
"""Per sub-layer, globs tried in order (the first that matches a module is used): the
project's GPT and nanoGPT name every dropout slot; Hugging Face GPT-2 has no dropout on the
FFN hidden activation, whose module there is ``mlp.act``."""
RULES = {
    "placement": "the pattern's placement (site i on the modules its modules glob matches)",
    "explicit": "the sites mapping (site i on the modules its selector matches)",
    "one-to-one": "one site per matched module, in order",
    "shared": "one site shared by every matched module",
    "stages": "stages on example_input or the first forward (site i on stage i)",
    "sub-layers": "sub-layers (each site on the modules of its apply_to)",
}
"""The ways sites are mapped to modules (``handle.rule``), as ``str(handle)`` names them."""
Selector = str | type | Sequence[str | type]
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_FLAG_TABLES = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
_SHOWN_NAMES = 4
_ABSENT = object()
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class PatternHandle:
    """One pattern applied to a model: its layers by hooked module name, and ``remove()``.

    Use as a context manager to apply a pattern for a ``with`` block.
    """

    def __init__(self, model: nn.Module, pattern: Pattern, key: str, rule: str,
                 placement_unused: str | None = None) -> None:
        self.model = model
        self.pattern = pattern
        self.key = key
        self.dropouts: dict[str, PatternDropout] = {}
        self.residual_blocks: list[str] = []
        self.assignment: dict[str, int] = {}
        """Hooked module name -> index of the pattern site it got (empty while pending)."""
        self.rule = rule
        """How sites were mapped to modules: one of :data:`RULES`."""
        self.placement_unused = placement_unused
        """Why the pattern's placement globs were not used (None: used, absent, or
        ``sites=`` given)."""
        self._pending: _StageDiscovery | None = None

    def _install(self, assignment: list[tuple]) -> None:
        """Add the layers and hooks of ``assignment`` (name, module, site index, sub-layer)."""
        hooks: dict[str, _MaskHook] = {}
        for name, module, index, sublayer in assignment:
            layer = PatternDropout(self.pattern.sites[index], self.pattern.kind, sublayer)
            self.dropouts[name] = layer.train(self.model.training)
            module.add_module(_layer_name(self.key), layer)
            hooks[name] = _MaskHook(self.key, layer)
            module.register_forward_hook(hooks[name])
            self.assignment[name] = index
        if self.pattern.kind == CONV:
            self.residual_blocks = _wire_residuals(self.model, self.key, self.dropouts, hooks)

    def _defer(self, chosen: list[tuple[str, nn.Module]]) -> None:
        """Map ``chosen`` to stages on the model's first forward (a pre-hook until then)."""
        self._pending = _StageDiscovery(self, chosen)
        self.model.register_forward_pre_hook(self._pending, with_kwargs=True)

    @property
    def module_names(self) -> list[str]:
        """The hooked modules, in ``named_modules()`` order."""
        return list(self.dropouts)

    @property
    def applied(self) -> bool:
        first = next(iter(self.dropouts), None)
        return (first is not None
                and _layer_name(self.key) in self.model.get_submodule(first)._modules)

    @property
    def pending(self) -> bool:
        """Waiting for the model's first forward to map the sites to its stages."""
        return any(hook is self._pending for hook in self.model._forward_pre_hooks.values())

    def _state(self) -> str:
        return "pending" if self.pending else "applied" if self.applied else "removed"

    def remove(self) -> None:
        """Take the pattern out: hooks, layers and residual slots; idempotent."""
        _remove(self.model, self.key)

    def __enter__(self) -> PatternHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"PatternHandle({self.pattern!r}, modules={len(self.dropouts)}, "
                f"residual_blocks={len(self.residual_blocks)}, {self._state()})")

    def __str__(self) -> str:
        mapped = (f"{len(self.assignment)} modules" if self.assignment
                  else "modules mapped on the first forward")
        lines = [f"{self.pattern.kind} pattern, {len(self.pattern)} sites -> {mapped} "
                 f"({self._state()})", f"  rule: {RULES[self.rule]}"]
        if self.placement_unused:
            lines.append(f"  placement not used: {self.placement_unused}")
        if not self.assignment:
            return "\n".join(lines)
        labels = [f" ({name})" for name in _site_names(self.pattern)] or [""] * len(self.pattern)
        for index, label in enumerate(labels):
            names = [name for name, i in self.assignment.items() if i == index]
            lines.append(f"  site {index}{label}: {', '.join(names) if names else '(no module)'}")
        if self.residual_blocks:
            lines.append(f"  residual blocks: {', '.join(self.residual_blocks)}")
        return "\n".join(lines)


def apply_pattern(model: nn.Module, pattern: Pattern,
                  sites: Selector | Mapping[Any, Selector] | None = None, *,
                  example_input: Any = None) -> PatternHandle:
    """Insert ``pattern``'s dropout into ``model`` by forward hooks; see the module docstring.

    ``example_input`` (a tensor, or a tuple of positional arguments) lets a conv pattern
    whose site count differs from the matched modules map its sites to the model's
    stages: one eval-mode forward on it groups the matched modules by output size; without
    it that forward runs on the inputs of the model's first call, which then proceeds with
    the pattern in place (``handle.assignment`` is empty until then). Without
    ``sites``, a conv pattern whose placement names its sites' modules (an exported search
    result) goes where those globs say when each matches a module of ``model``. Returns
    a :class:`PatternHandle` whose ``remove()`` restores the model exactly and whose
    ``assignment`` says which site each module got.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be an autodropout Pattern, got {type(pattern).__name__}")
    candidates = _candidates(model)
    if pattern.kind == CONV:
        rule, assignment, placement_unused = _assign_conv(model, candidates, pattern, sites,
                                                          example_input)
    else:
        rule, placement_unused = "sub-layers", None
        assignment = _assign_sequence(candidates, pattern, sites)

    key = next(str(i) for i in itertools.count() if not _holds_key(model, str(i)))
    handle = PatternHandle(model, pattern, key, rule, placement_unused)
    deferred = [(name, module) for name, module, index, _ in assignment if index is None]
    if deferred:
        handle._defer(deferred)
    else:
        handle._install(assignment)
    return handle


def strip_pattern(model: nn.Module) -> int:
    """Remove every pattern applied to ``model``; returns how many there were."""
    return len(_remove(model, None))


# -- selection ---------------------------------------------------------------------------------
def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules that may be sites: not the root, not what a pattern added."""
    return [
        (name, module) for name, module in model.named_modules()
        if name and not any(part.startswith(PREFIX) for part in name.split("."))
    ]


def _select(candidates: list[tuple[str, nn.Module]], selector: Selector,
            where: str = "sites") -> list[tuple[str, nn.Module]]:
    items = [selector] if isinstance(selector, (str, type)) else selector
    if not isinstance(items, Sequence) or not items:
        raise ValueError(f"{where} must be a glob, an nn.Module type or a non-empty list of them, "
                         f"got {selector!r}")
    for item in items:
        if not isinstance(item, str) and not (isinstance(item, type)
                                              and issubclass(item, nn.Module)):
            raise ValueError(f"{where} must hold module-name globs or nn.Module types, "
                             f"got {item!r}")
        if not any(_matches(item, *pair) for pair in candidates):
            raise ValueError(f"{where}: selector {_describe(item)} matches no module")
    chosen = [pair for pair in candidates if any(_matches(item, *pair) for item in items)]
    for name, module in chosen:
        if isinstance(module, _CONTAINERS):
            raise ValueError(f"{where}: {name} is a {type(module).__name__}, which runs (or "
                             "holds) its children; select the layer whose output to drop")
    return chosen


def _matches(item: str | type, name: str, module: nn.Module) -> bool:
    if isinstance(item, str):
        return fnmatch.fnmatchcase(name, item)
    return isinstance(module, item)


def _describe(selector: Any) -> str:
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, str):
        return repr(selector)
    return "[" + ", ".join(_describe(item) for item in selector) + "]"


def _assign_conv(model: nn.Module, candidates, pattern: Pattern, sites: Any,
                 example_input: Any) -> tuple[str, list[tuple], str | None]:
    """The rule used, the assignment, and why the pattern's placement went unused (if so).

    A site index of ``None`` (every entry, rule ``stages``, no ``example_input``): mapped by
    stages on the model's first forward.
    """
    if isinstance(sites, Mapping):
        return "explicit", _assign_conv_per_site(candidates, pattern, sites), None
    unused = None
    if sites is None:
        globs, unused = _placement_globs(candidates, pattern)
        if globs is not None:
            assignment = _assign_conv_per_site(candidates, pattern, globs, "placement")
            return "placement", assignment, None
    chosen = _default_conv_sites(candidates) if sites is None else _select(candidates, sites)
    if len(pattern) in (1, len(chosen)):
        spread = _spread(len(pattern), chosen, "sites")
        rule = "one-to-one" if len(pattern) == len(chosen) else "shared"
    elif example_input is None:
        spread, rule = [None] * len(chosen), "stages"
    else:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        spread, rule = _by_stages(model, chosen, len(pattern), args, {}), "stages"
    return rule, [(name, module, i, None) for (name, module), i in zip(chosen, spread)], unused


def _placement_globs(candidates, pattern: Pattern) -> tuple[dict[int, str] | None, str | None]:
    """The placement's glob per site when every one matches a module, else why not (no
    reason when the placement names no modules)."""
    places = pattern.placement or ()
    if not any(place.modules for place in places):
        return None, None
    for index, place in enumerate(places):
        if place.modules is None:
            return None, f"site {index} ({place.name}) has no modules glob"
        if not any(_matches(place.modules, *pair) for pair in candidates):
            return None, f"site {index} ({place.name}) glob {place.modules!r} matches no module"
    return {index: place.modules for index, place in enumerate(places)}, None


def _default_conv_sites(candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Every ``nn.BatchNorm2d``; without one, an error naming the normalisation layers."""
    if any(isinstance(module, nn.BatchNorm2d) for _, module in candidates):
        return _select(candidates, nn.BatchNorm2d)
    norms = [(name, type(module)) for name, module in candidates
             if "Norm" in type(module).__name__]
    choose = "(a module-name glob, an nn.Module type or a list of them)"
    if not norms:
        raise ValueError("sites: the model has no BatchNorm2d (the default conv sites) and no "
                         f"normalisation layer; choose the modules with sites= {choose}")
    types = list(dict.fromkeys(kind for _, kind in norms))
    raise ValueError(
        f"sites: the model has no BatchNorm2d (the default conv sites), but {len(norms)} "
        f"normalisation layers: {', '.join(kind.__name__ for kind in types)} "
        f"({_shown([name for name, _ in norms])}); target them with "
        f"sites={_qualified(types[0])}, a glob of their names, or any selector {choose}"
    )


def _qualified(kind: type) -> str:
    """``nn.GroupNorm`` for a ``torch.nn`` type, else the class name."""
    return f"nn.{kind.__name__}" if getattr(nn, kind.__name__, None) is kind else kind.__name__


def _shown(names: Sequence[str]) -> str:
    """The first few ``names``, then ``...`` if there are more."""
    return ", ".join(names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")


def _spread(n_sites: int, chosen: list[tuple[str, nn.Module]], where: str) -> list[int]:
    """Site index per chosen module: one each, or the single site for all."""
    if n_sites == len(chosen):
        return list(range(n_sites))
    if n_sites == 1:
        return [0] * len(chosen)
    names = [name for name, _ in chosen]
    raise ValueError(
        f"{where}: the pattern has {n_sites} sites but {len(names)} modules matched "
        f"({_shown(names)}); "
        f"give one site per matched module or a single site to share"
    )


def _by_stages(model: nn.Module, chosen: list[tuple[str, nn.Module]], n_sites: int,
               args: tuple, kwargs: dict[str, Any], source: str = "example_input") -> list[int]:
    """Site index per chosen module from one eval forward: stage ``i`` gets site ``i``."""
    order: list[str] = []
    sizes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in sizes:
                shape = tuple(output.shape) if isinstance(output, Tensor) else ()
                sizes[name] = shape[2:]
                order.append(name)
        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in chosen]
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    unused = [name for name, _ in chosen if name not in sizes]
    if unused:
        raise ValueError(f"sites: {_shown(unused)} matched but did not run on {source}, "
                         "so they belong to no stage")
    stages: list[list[str]] = []
    for name in order:
        if stages and sizes[stages[-1][-1]] == sizes[name]:
            stages[-1].append(name)
        else:
            stages.append([name])
    if len(stages) != n_sites:
        found = "; ".join(
            f"stage {i} ({'x'.join(map(str, sizes[names[0]])) or 'no map'}, "
            f"{len(names)} modules): {_shown(names)}"
            for i, names in enumerate(stages))
        raise ValueError(
            f"sites: the pattern has {n_sites} sites but {len(chosen)} modules matched in "
            f"{len(stages)} stages (runs of modules with the same output size, in forward "
            f"order): {found}; map each site to its own modules (sites={{0: "
            f"\"layer1.*.bn*\", 1: ...}}, indices 0..{n_sites - 1}) or use a single "
            "shared site"
        )
    stage_of = {name: i for i, names in enumerate(stages) for name in names}
    return [stage_of[name] for name, _ in chosen]


def _site_index(key: Any, pattern: Pattern) -> Any:
    """A mapping key as a site index: ints, digit strings (as read from YAML or JSON) and
    the site names of the pattern's placement."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    if not isinstance(key, str):
        return key
    names = _site_names(pattern)
    if key not in names:
        known = f"site names [{', '.join(names)}]" if names else "no site names (no placement)"
        raise ValueError(f"sites: keys must be site indices 0..{len(pattern) - 1} or site "
                         f"names; the pattern has {known}, got {key!r}")
    return names.index(key)


def _site_names(pattern: Pattern) -> list[str]:
    return [place.name for place in pattern.placement or ()]


def _assign_conv_per_site(candidates, pattern: Pattern, sites: Mapping,
                          where: str = "sites") -> list[tuple]:
    indices = [_site_index(key, pattern) for key in sites]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{where}: keys {sorted(sites, key=repr)} name a site twice")
    sites = dict(zip(indices, sites.values()))
    if set(sites) != set(range(len(pattern))):
        names = ", ".join(_site_names(pattern))
        also = f", or the site names {names}" if names else ""
        raise ValueError(f"{where}: a mapping for a conv pattern needs one selector per site "
                         f"(index 0..{len(pattern) - 1}{also}), got keys "
                         f"{sorted(sites, key=repr)}")
    owner: dict[str, int] = {}
    for index in range(len(pattern)):
        for name, _ in _select(candidates, sites[index], f"{where}[{index}]"):
            if name in owner:
                raise ValueError(f"{where}: module {name} is selected by both site "
                                 f"{owner[name]} and site {index}")
            owner[name] = index
    return [(name, module, owner[name], None) for name, module in candidates if name in owner]


def _assign_sequence(candidates, pattern: Pattern, sites: Any) -> list[tuple]:
    if sites is not None and not isinstance(sites, Mapping):
        raise ValueError("sites for a sequence pattern must map sub-layers "
                         f"({', '.join(SUBLAYERS)}) to selectors, got {sites!r}")
    overrides = dict(sites or {})
    unknown = sorted(set(overrides) - set(SUBLAYERS))
    if unknown:
        raise ValueError(f"sites: {unknown[0]!r} is not a sub-layer ({', '.join(SUBLAYERS)})")
    assignment, owner = [], {}
    for sublayer in SUBLAYERS:
        indices = [i for i, site in enumerate(pattern.sites) if sublayer in site["apply_to"]]
        if not indices:
            continue
        if sublayer in overrides:
            chosen = _select(candidates, overrides[sublayer], f"sites[{sublayer!r}]")
        else:
            chosen = _default_sequence_sites(candidates, sublayer)
        spread = _spread(len(indices), chosen, f"sites[{sublayer!r}]")
        for (name, module), j in zip(chosen, spread):
            if name in owner:
                raise ValueError(f"sites: module {name} is selected for both {owner[name]} and "
                                 f"{sublayer}; a module can be one sub-layer only")
            owner[name] = sublayer
            assignment.append((name, module, indices[j], sublayer))
    order = {name: i for i, (name, _) in enumerate(candidates)}
    return sorted(assignment, key=lambda entry: order[entry[0]])


def _default_sequence_sites(candidates, sublayer: str) -> list[tuple[str, nn.Module]]:
    """The modules of the first of ``sublayer``'s default globs that matches any."""
    where = f"sites[{sublayer!r}] (default)"
    for glob in SEQUENCE_DEFAULT_SITES[sublayer]:
        if any(_matches(glob, *pair) for pair in candidates):
            return _select(candidates, glob, where)
    raise ValueError(
        f"{where}: no module matches the default slots "
        f"{_describe(list(SEQUENCE_DEFAULT_SITES[sublayer]))}; pass sites={{{sublayer!r}: "
        f"selector}} with a selector of the modules whose output is the {sublayer} "
        f"activation (a module-name glob, an nn.Module type or a list of them), or leave "
        f"{sublayer} out of the pattern's apply_to"
    )


# -- wiring -------------------------------------------------------------------------------------
def _layer_name(key: str) -> str:
    return f"{PREFIX}{key}"


def _holds_key(model: nn.Module, key: str) -> bool:
    """A layer of pattern ``key``, or its pending stage discovery, is on ``model``."""
    pending = any(isinstance(hook, _StageDiscovery) and hook.key == key
                  for hook in model._forward_pre_hooks.values())
    return pending or any(_layer_name(key) in module._modules for module in model.modules())


def _wire_residuals(model: nn.Module, key: str, dropouts: dict[str, PatternDropout],
                    hooks: dict[str, _MaskHook]) -> list[str]:
    """Share the last site's mask with the residual branch of each residual block."""
    last_site: dict[str, str] = {}
    for name in dropouts:  # named_modules order, so the last write wins
        block = _enclosing_block(model, name)
        if block is not None:
            last_site[block] = name
    wired = []
    for block_name, site_name in last_site.items():
        dropout = dropouts[site_name]
        if not dropout.site["residual"]:
            continue
        block = model.get_submodule(block_name)
        shared = _SharedMask(key, dropout)
        hooks[site_name].shared = shared
        block.register_forward_pre_hook(shared)
        block.register_forward_hook(shared)
        slot = _slot_name(block)
        branch = None if slot == IDENTITY_FLAG else getattr(block, slot)
        if branch is not None:
            branch.register_forward_hook(_MaskHook(key, dropout, shared))
        else:  # the identity: mask the block's input for the addition, not for the main branch
            block.register_forward_pre_hook(_IdentityMask(key, shared))
            inner = [m for m in block.modules()
                     if m is not block and not isinstance(m, PatternDropout)]
            for module in inner:
                module.register_forward_pre_hook(_Unmask(key, shared), prepend=True)
        wired.append(block_name)
    return wired


def _enclosing_block(model: nn.Module, name: str) -> str | None:
    """The nearest residual block holding ``name`` outside its residual branch, if any."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        block = model.get_submodule(".".join(parts[:depth]))
        slot = _slot_name(block)
        if slot is not None:
            return None if parts[depth] == slot else ".".join(parts[:depth])
    return None


def _slot_name(module: nn.Module) -> str | None:
    """The attribute that makes ``module`` a residual block, if any."""
    for slot in RESIDUAL_SLOTS:
        value = getattr(module, slot, _ABSENT)
        if value is None or isinstance(value, nn.Module):
            return slot
    return IDENTITY_FLAG if getattr(module, IDENTITY_FLAG, None) is True else None


class _PatternHook:
    """A hook owned by the applied pattern ``key``, so removal finds it by type and key."""

    def __init__(self, key: str) -> None:
        self.key = key


class _StageDiscovery(_PatternHook):
    """Model forward pre-hook of a pattern waiting for its stages: on the first call it
    removes itself, maps the sites by stages on that call's inputs (as ``example_input``
    would), installs them and lets the call run with the pattern in place."""

    def __init__(self, handle: PatternHandle, chosen: list[tuple[str, nn.Module]]) -> None:
        super().__init__(handle.key)
        self.handle = handle
        self.chosen = chosen

    def __call__(self, model: nn.Module, args: tuple,
                 kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        _remove(model, self.key)  # only this hook holds the key yet
        spread = _by_stages(model, self.chosen, len(self.handle.pattern), args, kwargs,
                            "the first forward")
        before = set(model._forward_pre_hooks)
        self.handle._install([(name, module, index, None)
                              for (name, module), index in zip(self.chosen, spread)])
        # This call has already collected the model's pre-hooks: run the ones just added
        # (the model itself a residual block) as the call would have.
        for hook_id, hook in list(model._forward_pre_hooks.items()):
            if hook_id not in before:
                result = hook(model, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        return args, kwargs


class _MaskHook(_PatternHook):
    """Forward hook: output -> pattern-dropped output while the layer is training."""

    def __init__(self, key: str, dropout: PatternDropout, shared: _SharedMask | None = None):
        super().__init__(key)
        self.dropout = dropout
        self.shared = shared

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not self.dropout.training:
            return None
        if self.shared is None:
            return self.dropout(output)
        return output * self.shared.mask_for(output)


class _SharedMask(_PatternHook):
    """One block's mask for its last site and its residual branch.

    Drawn by whichever of the two runs first in a block call; the block's forward pre-hook
    and forward hook (this object) clear it, so no mask outlives or leaks across calls.
    """

    def __init__(self, key: str, dropout: PatternDropout) -> None:
        super().__init__(key)
        self.dropout = dropout
        self.mask: Tensor | None = None
        self.identity: tuple[Tensor, Tensor] | None = None
        self.unmasked = False

    def __call__(self, *hook_args: Any) -> None:
        unused = self.identity is not None and not self.unmasked
        self.mask = None
        self.identity = None  # (x, x * mask) of the current call, for an identity shortcut
        self.unmasked = False
        if unused and len(hook_args) == 3:  # the block's forward hook: the call is over
            raise RuntimeError(
                "residual: no module of this block received its input, so the identity "
                "shortcut cannot be masked apart from the main branch; start the main "
                "branch with a module call on the input, or give the block a shortcut module"
            )

    def mask_for(self, output: Tensor) -> Tensor:
        if self.mask is None:
            # The layer applied to ones is exactly its rescaled keep mask.
            self.mask = self.dropout(torch.ones_like(output))
        return _fit(self.mask, output.shape).to(output.dtype)


def _fit(mask: Tensor, shape: torch.Size) -> Tensor:
    if mask.shape == shape:
        return mask
    if len(shape) != 4 or mask.shape[:2] != shape[:2]:
        raise ValueError(
            f"residual: the residual branch output {tuple(shape)} must have the batch and "
            f"channels of the site output {tuple(mask.shape)}"
        )
    return F.interpolate(mask, size=tuple(shape[-2:]), mode="nearest")


class _IdentityMask(_PatternHook):
    """Block forward pre-hook for an identity shortcut: input ``x`` -> ``x * mask``."""

    def __init__(self, key: str, shared: _SharedMask) -> None:
        super().__init__(key)
        self.shared = shared

    def __call__(self, block: nn.Module, args: tuple) -> tuple | None:
        if not self.shared.dropout.training or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        masked = x * self.shared.mask_for(x)
        self.shared.identity = (x, masked)
        return (masked, *args[1:])


class _Unmask(_PatternHook):
    """Pre-hook on a module inside the block: ``x * mask`` -> ``x`` for the main branch."""

    def __init__(self, key: str, shared: _SharedMask) -> None:
        super().__init__(key)
        self.shared = shared

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        identity = self.shared.identity
        if identity is None or not args or args[0] is not identity[1]:
            return None
        self.shared.unmasked = True
        return (identity[0], *args[1:])


# -- removal -------------------------------------------------------------------------------------
def _remove(model: nn.Module, key: str | None) -> set[str]:
    """Undo pattern ``key`` (every pattern for ``None``); returns the keys removed."""

    def owned(owner_key: str) -> bool:
        return key is None or owner_key == key

    removed = set()
    modules = list(model.modules())
    for module in modules:
        for table_name in _HOOK_TABLES:
            table = getattr(module, table_name)
            hook_ids = [i for i, hook in table.items()
                        if isinstance(hook, _PatternHook) and owned(hook.key)]
            for hook_id in hook_ids:
                removed.add(table[hook_id].key)
                del table[hook_id]
                for flags in _HOOK_FLAG_TABLES:
                    getattr(module, flags, {}).pop(hook_id, None)
        for slot, child in list(module._modules.items()):
            if slot.startswith(PREFIX) and isinstance(child, PatternDropout):
                child_key = slot[len(PREFIX):]
                if owned(child_key):
                    delattr(module, slot)
                    removed.add(child_key)
    return removed

