"""Start-up cost of the package and the CLI, each in a fresh interpreter.

    python benchmarks/startup.py [--repeat 5]

Prints, for every import and command below, the best and median wall time over the
repeats and the heavy libraries it loaded. ``import torch`` is measured in the same run, so
the table shows what the project adds to the interpreter and to torch. ``patterns list`` and
``searches list`` run against an empty SQLite store in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("torch", "ray", "sqlalchemy", "alembic", "yaml", "matplotlib", "numpy", "tqdm")

IMPORTS = ("torch", "autodropout", "autodropout.cli", "patterns_db", "search_spaces")
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
    return elapsed, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


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
        rows = [(f"import {name}", [sys.executable, "-c", _probe(f"import {name}")])
                for name in IMPORTS]
        rows += [(f"autodropout {' '.join(c)}", _cli_argv(c)) for c in COMMANDS]
        rows.append(("python -c pass", [sys.executable, "-c", _probe("pass")]))
        print(f"{'what':<32} {'best s':>7} {'median s':>9}  heavy modules loaded")
        for label, argv in rows:
            times, loaded = [], ""
            for _ in range(args.repeat):
                elapsed, loaded = _time(argv, env)
                times.append(elapsed)
            print(f"{label:<32} {min(times):>7.3f} {statistics.median(times):>9.3f}  "
                  f"{loaded or '-'}")


if __name__ == "__main__":
    main()
