"""Start-up cost of the package and the CLI, each in a fresh interpreter.

    python benchmarks/startup.py [--repeat 5]

Prints, for every import and command below, the best and median wall time over the
repeats and the heavy libraries it loaded. ``import torch`` and an empty interpreter are
measured in the same run, so the table shows what the project adds to both. Commands run
through the installed ``autodropout`` entry point (what a user types); the modules they load
come from the same command run in-process. ``patterns list`` and ``searches list`` run
against an empty SQLite store in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("torch", "ray", "sqlalchemy", "alembic", "yaml", "matplotlib", "numpy", "tqdm")

IMPORTS = (
    "import torch",
    "import autodropout",
    "import autodropout.cli",
    "import patterns_db",
    "from patterns_db import PatternStore",
    "import search_spaces",
    "import workers.final",
    "import controller.service",
)
COMMANDS = (
    ("--version",),
    ("--help",),
    ("patterns", "list"),
    ("searches", "list"),
)


def _probe(code: str) -> str:
    return f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"


def _time(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    return elapsed, lines[-1] if lines else ""


def _cli_argv(args: tuple[str, ...]) -> list[str]:
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['autodropout', *{list(args)!r}]\n"
        "from autodropout.cli import main\n"
        "import io, contextlib\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        main(sys.argv[1:])\n"
        "    except SystemExit:\n"
        "        pass\n"
    )
    return [sys.executable, "-c", _probe(probe)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "AUTODROPOUT_DB": os.path.join(tmp, "store.db")}
        subprocess.run([sys.executable, "-c", "from patterns_db import PatternStore; "
                        "PatternStore().close()"], env=env, check=True)
        entry = shutil.which("autodropout")
        if entry is None:
            raise SystemExit("the autodropout command is not installed (pip install -e .)")
        rows = [(code, [sys.executable, "-c", _probe(code)], None) for code in IMPORTS]
        rows += [(f"autodropout {' '.join(c)}", [entry, *c], _cli_argv(c)) for c in COMMANDS]
        rows.append(("python -c pass", [sys.executable, "-c", _probe("pass")], None))
        print(f"{'what':<38} {'best s':>7} {'median s':>9}  heavy modules loaded")
        for label, argv, probe in rows:
            times = [_time(argv, env)[0] for _ in range(args.repeat)]
            loaded = _time(probe or argv, env)[1]
            print(f"{label:<38} {min(times):>7.3f} {statistics.median(times):>9.3f}  "
                  f"{loaded or '-'}")


if __name__ == "__main__":
    main()
