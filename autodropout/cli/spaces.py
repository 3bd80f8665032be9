"""``autodropout spaces list|show``: the shipped search spaces and user YAML files."""

from __future__ import annotations

import argparse

from .output import print_table


def register(commands: argparse._SubParsersAction) -> None:
    spaces = commands.add_parser("spaces", help="list and show search spaces")
    actions = spaces.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the search spaces shipped with autodropout")
    listing.set_defaults(handler=list_spaces)
    show = actions.add_parser("show", help="a space's sites, decisions and budget")
    show.add_argument("space", metavar="NAME|PATH")
    show.set_defaults(handler=show_space)


def list_spaces(args: argparse.Namespace) -> int:
    import search_spaces

    header = ("NAME", "KIND", "SITES", "DECISIONS", "LOG10 SIZE", "DESCRIPTION")
    rows = []
    for name in search_spaces.available():
        space = search_spaces.load(name)
        rows.append(
            (name, space.kind, str(space.num_sites), str(len(space.decisions)),
             f"{space.log10_size:.1f}", space.description)
        )
    print_table(header, rows)
    return 0


def show_space(args: argparse.Namespace) -> int:
    import search_spaces
    from controller.preflight import check_space

    space = search_spaces.load(args.space)
    check_space(space, require=False)  # a budget a search would refuse is refused here too
    print(f"{space.name} ({space.kind}): {space.description}".rstrip(": "))
    print(f"file: {space.source}")
    print(f"sites: {space.num_sites}, decisions: {len(space.decisions)}, "
          f"size: 10^{space.log10_size:.2f} patterns")
    if space.max_drop is not None:
        print(f"max_drop: {space.max_drop:g} (expected fraction dropped per site), "
              f"10^{space.bounded_log10_size:.2f} patterns within it")
    for index, site in enumerate(space.sites):
        where = f" -> {site.modules}" if site.modules else ""
        print(f"\nsite {index} {site.name}{where}")
        for name, choices in site.choices.items():
            shown = ", ".join(_format(choice) for choice in choices)
            print(f"  {name:<9} {shown}{'' if len(choices) > 1 else '   (fixed)'}")
    for section in ("budget", "controller"):
        settings = getattr(space, section)
        if settings:
            print(f"\n{section}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return 0


def _format(choice: object) -> str:
    if isinstance(choice, tuple):
        return "[" + ", ".join(choice) + "]"
    if isinstance(choice, bool):
        return str(choice).lower()
    return f"{choice:g}" if isinstance(choice, float) else str(choice)
