"""Load and validate search-space YAML files; every error names the file, line and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autodropout.errors import BadInput
from autodropout.patterns.fields import SITE_FIELDS, PatternError, check_kind
from autodropout.validation import check_int, check_real

from .settings import BUDGET_SETTINGS, CONTROLLER_SETTINGS, Setting
from .space import SearchSpace, SiteSpec

SPACES_DIR = Path(__file__).resolve().parent

TOP_LEVEL_KEYS = ("name", "kind", "description", "sites", "decisions", "budget", "controller",
                  "max_drop", "map_size")
SITE_KEYS = ("name", "modules", "decisions", "map_size")

class SpaceError(BadInput):
    """A malformed search-space file; the message is ``file:line: key: problem``."""


def available() -> list[str]:
    """Names of the spaces shipped with the package."""
    return sorted(path.stem for path in SPACES_DIR.glob("*.yaml"))


def resolve(name_or_path: str | Path) -> Path:
    """The file behind a shipped space name or a path to a user's YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix.lower() in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise SpaceError(f"{candidate}: no such search-space file")
        return candidate
    shipped = SPACES_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise SpaceError(
            f"unknown search space {str(name_or_path)!r}; shipped spaces: {', '.join(available())}"
            " (or pass a path to a .yaml file)"
        )
    return shipped


def load(name_or_path: str | Path) -> SearchSpace:
    """Load a shipped space by name (``convnet``, ``transformer``, ``tiny``) or a YAML path."""
    path = resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpaceError(f"{path}: cannot read ({error.strerror})") from None
    return parse(text, source=str(path))


def location(space: SearchSpace, key: str) -> str:
    """``file:line: key`` for a dotted ``key`` of ``space``'s YAML (``budget.model``,
    ``sites[1].modules``): where an error about that key points. Without the key in the
    text (a default), the line of its section, else ``file: key``."""
    line = key_line(space.yaml_text, key)
    return f"{space.source}:{line}: {key}" if line else f"{space.source}: {key}"


def key_line(text: str, key: str) -> int | None:
    """The 1-based line of dotted ``key`` (``a.b``, ``a[2].b``) in YAML ``text``, or of the
    nearest enclosing key present; ``None`` when even the first is absent or the text is not
    YAML."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in key.replace("[", ".[").split("."):
        if part.startswith("[") and isinstance(node, yaml.SequenceNode):
            index = int(part.strip("[]"))
            if index >= len(node.value):
                break
            node = node.value[index]
            line = node.start_mark.line + 1
        elif isinstance(node, yaml.MappingNode):
            found = next((pair for pair in node.value
                          if isinstance(pair[0], yaml.ScalarNode) and pair[0].value == part), None)
            if found is None:
                break
            line = found[0].start_mark.line + 1
            node = found[1]
        else:
            break
    return line


def parse(text: str, source: str = "<string>") -> SearchSpace:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(error, "problem", None) or str(error)
        raise SpaceError(f"{source}:{line}: invalid YAML ({problem})") from None
    return _Parser(source).space(root, text)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node | None, key: str, problem: str) -> SpaceError:
        line = node.start_mark.line + 1 if node is not None else 1
        return SpaceError(f"{self.source}:{line}: {key}: {problem}")

    def mapping(self, node: yaml.Node | None, key: str, allowed: tuple[str, ...] | None) -> dict:
        """A mapping node as {key: (key_node, value_node)}, refusing duplicates/unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, "must be a mapping")
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            name = self.value(key_node)
            path = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str):
                raise self.fail(key_node, path, "keys must be strings")
            if name in entries:
                raise self.fail(key_node, path, "duplicate key")
            if allowed is not None and name not in allowed:
                raise self.fail(key_node, path, f"unknown key (allowed: {', '.join(allowed)})")
            entries[name] = (key_node, value_node)
        return entries

    def value(self, node: yaml.Node) -> Any:
        return yaml.SafeLoader("").construct_object(node, deep=True)

    def space(self, root: yaml.Node | None, text: str) -> SearchSpace:
        if root is None:
            raise self.fail(None, "(file)", "is empty")
        top = self.mapping(root, "", TOP_LEVEL_KEYS)
        for required in ("name", "kind", "sites", "decisions"):
            if required not in top:
                raise self.fail(root, required, "missing")
        name = self.string(top["name"][1], "name")
        kind_node = top["kind"][1]
        try:
            kind = check_kind(self.value(kind_node))
        except PatternError as error:
            raise self.fail(kind_node, "kind", str(error).split(": ", 1)[1]) from None
        key_node, value_node = top["decisions"]
        defaults = self.decisions(value_node, "decisions", kind, complete_at=key_node)
        sites = self.sites(top["sites"][1], kind, defaults)
        max_drop = None
        if "max_drop" in top:
            node = top["max_drop"][1]
            try:
                max_drop = check_real(self.value(node), "", low=0, high=1, low_open=True)
            except ValueError as error:
                raise self.fail(node, "max_drop", str(error).lstrip()) from None
        map_size = self.map_size(top["map_size"][1], "map_size") if "map_size" in top else None
        space = SearchSpace(
            name=name,
            kind=kind,
            sites=sites,
            budget=self.settings(top.get("budget"), "budget", BUDGET_SETTINGS),
            controller=self.settings(top.get("controller"), "controller", CONTROLLER_SETTINGS),
            description=self.string(top["description"][1], "description") if "description" in top else "",
            source=self.source,
            yaml_text=text,
            max_drop=max_drop,
            map_size=map_size,
        )
        if max_drop is not None:
            try:
                space.choice_masks  # noqa: B018 -- computed (and cached) now: a bad bound fails the load
            except ValueError as error:
                raise self.fail(top["max_drop"][1], "max_drop", str(error)) from None
        return space

    def map_size(self, node: yaml.Node, key: str) -> tuple[int, int]:
        """``28`` or ``[28, 28]``: the (height, width) or (tokens, features) of a site's plane."""
        value = self.value(node)
        values = value if isinstance(value, list) else [value, value]
        try:
            if len(values) != 2:
                raise ValueError
            return tuple(check_int(v, "", low=1) for v in values)
        except ValueError:
            raise self.fail(node, key, f"must be a positive integer or a list of two, got {value!r}") from None

    def string(self, node: yaml.Node, key: str) -> str:
        value = self.value(node)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(node, key, f"must be a non-empty string, got {value!r}")
        return value

    def decisions(self, node: yaml.Node, key: str, kind: str, complete_at=None) -> dict:
        """Choices per field; with ``complete_at`` (the key node), every field is required."""
        names = tuple(f.name for f in SITE_FIELDS[kind])
        entries = self.mapping(node, key, names)
        optional = {f.name for f in SITE_FIELDS[kind] if f.default is not None}
        missing = [name for name in names if name not in entries and name not in optional]
        if complete_at is not None and missing:
            raise self.fail(complete_at, f"{key}.{missing[0]}", "missing (every decision needs choices)")
        fields = {f.name: f for f in SITE_FIELDS[kind]}
        choices = {name: (fields[name].default,) for name in optional} if complete_at is not None else {}
        return {
            **choices,
            **{name: self.choices(value_node, f"{key}.{name}", fields[name])
               for name, (_, value_node) in entries.items()},
        }

    def choices(self, node: yaml.Node, key: str, field) -> tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, key, "must be a list of choices")
        if not node.value:
            raise self.fail(node, key, "has no choices")
        checked = []
        for item in node.value:
            try:
                value = field.check(self.value(item), "")
            except PatternError as error:
                raise self.fail(item, key, str(error).split(": ", 1)[1]) from None
            if value in checked:
                raise self.fail(item, key, f"duplicate choice {self.value(item)!r}")
            checked.append(value)
        return tuple(checked)

    def sites(self, node: yaml.Node, kind: str, defaults: dict) -> tuple[SiteSpec, ...]:
        if isinstance(node, yaml.ScalarNode):
            count = self.value(node)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise self.fail(node, "sites", f"must be a positive integer or a list, got {count!r}")
            return tuple(SiteSpec(f"site{i}", dict(defaults)) for i in range(count))
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, "sites", "must be a positive integer or a non-empty list of sites")
        specs = []
        for index, site_node in enumerate(node.value):
            key = f"sites[{index}]"
            entries = self.mapping(site_node, key, SITE_KEYS)
            overrides = (
                self.decisions(entries["decisions"][1], f"{key}.decisions", kind)
                if "decisions" in entries
                else {}
            )
            name = self.string(entries["name"][1], f"{key}.name") if "name" in entries else f"site{index}"
            modules = self.string(entries["modules"][1], f"{key}.modules") if "modules" in entries else None
            map_size = (self.map_size(entries["map_size"][1], f"{key}.map_size")
                        if "map_size" in entries else None)
            merged = {**defaults, **overrides}
            specs.append(SiteSpec(name, {f.name: merged[f.name] for f in SITE_FIELDS[kind]},
                                  modules, map_size))
        names = [spec.name for spec in specs]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise self.fail(node, "sites", f"duplicate site name {duplicate!r}")
        return tuple(specs)

    def settings(self, entry: tuple | None, key: str, schema: dict[str, Setting]) -> dict:
        if entry is None:
            return {}
        result = {}
        for name, (_, value_node) in self.mapping(entry[1], key, tuple(schema)).items():
            try:
                result[name] = schema[name].check(self.value(value_node), "")
            except ValueError as error:
                raise self.fail(value_node, f"{key}.{name}", str(error).lstrip()) from None
        return result
