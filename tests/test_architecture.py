"""The import architecture: imports point one way, nothing heavy loads where it is not used.

Layers and patterns are the ground; search spaces and the store stand on them; workers on
those; the search (``controller``) on workers; the CLI on top, imported by nothing. The
static test reads every import statement of the project (module level and inside
functions); the dynamic table imports each entry point in a fresh interpreter and lists the
heavy libraries it loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("autodropout", "search_spaces", "patterns_db", "workers", "controller")

# (module prefix, layer, rank): the longest matching prefix decides a module's layer.
LAYERS = (
    ("autodropout", "ground", 0),
    ("autodropout.errors", "ground", 0),
    ("autodropout.validation", "ground", 0),
    ("autodropout.registry", "ground", 0),
    ("autodropout._lazy", "ground", 0),
    ("autodropout.atomic", "ground", 0),
    ("autodropout.layers", "ground", 0),
    ("autodropout.patterns", "ground", 0),
    ("autodropout.builtin", "ground", 0),
    ("search_spaces", "spaces", 1),
    ("patterns_db", "store", 1),
    ("autodropout.load", "store", 1),
    ("workers", "workers", 2),
    ("controller", "search", 3),
    ("autodropout.cli", "cli", 4),
    ("autodropout.__main__", "cli", 4),
)


def layer_of(module: str) -> tuple[str, int]:
    matches = [(prefix, layer, rank) for prefix, layer, rank in LAYERS
               if module == prefix or module.startswith(prefix + ".")]
    _, layer, rank = max(matches, key=lambda match: len(match[0]))
    return layer, rank


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue  # Alembic scripts, run by Alembic only
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement of ``path`` naming the project."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def test_every_module_has_a_layer():
    for module in project_modules():
        layer_of(module)  # raises ValueError from max() for a module outside the table


def test_imports_point_down():
    wrong = []
    for module, path in sorted(project_modules().items()):
        layer, rank = layer_of(module)
        for line, target in imports_of(module, path):
            target_layer, target_rank = layer_of(target)
            if target_layer != layer and target_rank >= rank:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {layer} module {module} "
                             f"imports {target} ({target_layer})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    modules = project_modules()
    graph = {module: {target for _, target in imports_of(module, path) if target in modules}
             - {module} for module, path in modules.items()}
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            cycle = trail[trail.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


HEAVY = ("torch", "ray", "sqlalchemy", "alembic", "yaml", "matplotlib", "numpy")
# code run in a fresh interpreter -> the heavy libraries it must not load
MUST_NOT_LOAD = {
    "import autodropout": HEAVY,
    "import autodropout.cli; autodropout.cli.build_parser()": HEAVY,
    "import patterns_db; from patterns_db import TrialState, SearchRecord": HEAVY,
    "from patterns_db import PatternStore": ("torch", "ray", "yaml", "matplotlib"),
    "from autodropout.patterns.files import read_pattern_file": ("torch", "ray", "sqlalchemy"),
    "import search_spaces": ("torch", "ray", "sqlalchemy", "matplotlib"),
    "from autodropout import Dropout, apply_pattern, Pattern": ("ray", "sqlalchemy", "yaml",
                                                                "matplotlib"),
    "import workers.final, workers.training, workers.regularizers": ("ray", "sqlalchemy"),
    "import controller.controllers, controller.policy": ("ray", "sqlalchemy"),
}


@pytest.mark.parametrize("code", list(MUST_NOT_LOAD))
def test_entry_point_loads_nothing_it_does_not_use(code):
    probe = (f"{code}\nimport sys\n"
             f"print(','.join(m for m in {MUST_NOT_LOAD[code]!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{code!r} loaded {done.stdout.strip()}"


def test_lazy_names_resolve_to_their_implementations():
    import autodropout
    import autodropout.layers
    import autodropout.patterns.figures

    assert set(autodropout.LAYERS) == set(autodropout.layers.__all__)
    for name in autodropout.__all__:
        assert getattr(autodropout, name) is not None
    assert autodropout.render is autodropout.patterns.figures.render
    assert "Dropout" in dir(autodropout)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        _ = autodropout.nothing
