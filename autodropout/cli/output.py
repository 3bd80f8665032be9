"""What the sub-commands share: aligned tables, field lists, JSON, number formats, the
``--db`` option and argument types. Nothing here imports more than the standard library."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

DB_HELP = ("SQLAlchemy URL or SQLite file (default: $AUTODROPOUT_DB, else "
           "$XDG_DATA_HOME/autodropout/patterns.db)")


def db_option() -> argparse.ArgumentParser:
    """A parent parser holding the ``--db URL`` option of every store command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", metavar="URL", help=DB_HELP)
    return common


def json_help(doc: str | None) -> str:
    """The ``--json`` part of a command module's docstring, as plain text for ``--help``."""
    _, title, body = (doc or "").partition("``--json`` output")
    return (title + body).replace("``", "")


def store_group(commands: argparse._SubParsersAction, name: str, doc: str | None, help: str,
                description: str) -> argparse._SubParsersAction:
    """The sub-commands of a store command group (``patterns``, ``searches``), whose ``--help``
    ends with the ``--json`` part of the group module's docstring ``doc``."""
    group = commands.add_parser(name, epilog=json_help(doc), help=help, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def open_store(args: argparse.Namespace, create: bool = False):
    """The store ``--db`` names (imports SQLAlchemy now, torch never)."""
    from patterns_db import PatternStore

    return PatternStore(args.db, create=create)


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name:<{width}}  {value}")


def print_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[str] = (),
    indent: str = "",
) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        cells = [
            f"{cell:>{width}}" if name in right else f"{cell:<{width}}"
            for name, cell, width in zip(header, row, widths, strict=True)
        ]
        print(indent + "  ".join(cells).rstrip())


def print_json(data: Any) -> int:
    print(json.dumps(data, indent=2, sort_keys=True, allow_nan=False))
    return 0


def number(value: float | None) -> str:
    """A metric for a table: four decimals, ``-`` when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"


def value_text(value: Any) -> str:
    """A pattern or space value as the YAML would spell it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
