"""The ``autodropout`` command. Each sub-command group lives in its own module with a
``register(subparsers)`` function; heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import importlib
import sys

from autodropout import __version__
from autodropout.errors import BadInput, NotFound

COMMAND_MODULES: tuple[str, ...] = ("spaces", "patterns", "searches", "search", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autodropout",
        description="Learned dropout patterns: search them, store them, export them.",
    )
    parser.add_argument("--version", action="version", version=f"autodropout {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"autodropout.cli.{name}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return int(args.handler(args) or 0)
    except (BadInput, NotFound) as error:
        print(f"autodropout: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("autodropout: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
