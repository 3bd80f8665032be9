"""``autodropout patterns list|show|export|import|tag``: stored patterns from a shell.

Every command takes ``--db URL`` (a SQLAlchemy URL or a SQLite file; default
``$AUTODROPOUT_DB``, else ``$XDG_DATA_HOME/autodropout/patterns.db``). The built-in
patterns shipped with the package (:mod:`autodropout.builtin`) need none: ``patterns list
--builtin`` and ``patterns show builtin:NAME`` open no database. Exit codes: 0 ok, 1 not
found, 2 bad input.

``--json`` output is a stable interface for scripts: keys are only ever added, never renamed
or removed. Times are ISO 8601 UTC strings, rewards and metric values numbers (``null``
when absent), hashes full 64-digit SHA-256 hex.

* ``patterns list --json``: a list, best first, of
  ``{"id", "hash", "kind", "reward", "search", "trial", "space", "dataset", "model", "tags"}``;
  without trial filters (``--space``, ``--dataset``, ``--model``, ``--search``,
  ``--min-reward``) patterns with no completed trial (imported ones) follow, newest first,
  with ``reward``, ``search``, ``trial``, ``dataset`` and ``model`` null.
* ``patterns list --builtin --json``: a list, by name, of the built-in patterns' catalog
  entries (``{"name", "version", "file", "hash", "summary", "space", "dataset", "model",
  "model_args", "map_shape", "search", "validation", "test", "report"}``, see
  autodropout.builtin.catalog; ``test`` values null where not measured) plus ``"ref"``
  (``builtin:NAME@VERSION``) and ``"kind"``.
* ``patterns show REF --json``: ``{"id", "hash", "kind", "space", "tags", "created_at",
  "pattern", "best_reward", "trials", "final_evaluations"}``; ``pattern`` is the exported
  pattern object, ``trials`` a list of ``{"search", "trial", "reward", "status"}`` (best
  first), ``final_evaluations`` a list of ``{"subject", "dataset", "model", "metric", "seed",
  "value"}`` where ``subject`` is ``"pattern"`` or ``"baseline:<name>"`` (baselines on the
  pattern's datasets and models).
* ``patterns show builtin:NAME --json``: the built-in's object of ``patterns list --builtin
  --json`` plus ``"pattern"``, the exported pattern object.
* ``patterns import FILE --json``: ``{"id", "hash", "kind", "tags"}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from autodropout.builtin import BuiltinPattern, builtin_patterns, is_builtin_ref, resolve_builtin
from autodropout.errors import BadInput
from patterns_db.states import TrialState

from .output import (
    db_option,
    number,
    open_store,
    positive_int,
    print_fields,
    print_json,
    print_table,
    store_group,
    value_text,
)

DEFAULT_TOP = 10
DEFAULT_SHAPES = {"conv": (1, 32, 32), "sequence": (32, 64)}


def register(commands: argparse._SubParsersAction) -> None:
    sub = store_group(commands, "patterns", __doc__,
                      help="list, show, export, import and tag stored patterns",
                      description="Stored dropout patterns. REF is a tag, a pattern id or a "
                      "hash prefix; show also takes builtin:NAME, a built-in pattern.")
    common = db_option()
    for add in (_add_list, _add_show, _add_export, _add_import, _add_tag):
        add(sub, common)


def _add_list(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    listing = sub.add_parser("list", parents=[common],
                             help="the best patterns, then those not tried yet, as a table")
    listing.add_argument("--space", help="only trials of searches over this space")
    listing.add_argument("--dataset", help="only trials on this dataset")
    listing.add_argument("--model", help="only trials of this model")
    listing.add_argument("--search", help="only trials of this search")
    listing.add_argument("--kind", choices=("conv", "sequence"), help="only this kind")
    listing.add_argument("--min-reward", type=float, metavar="R", help="only rewards >= R")
    listing.add_argument("--top", type=positive_int, default=DEFAULT_TOP, metavar="K",
                         help=f"how many patterns (default {DEFAULT_TOP})")
    listing.add_argument("--builtin", action="store_true",
                         help="list the built-in patterns instead, with their test gains (no "
                         "database; --space, --dataset, --model, --kind and --top apply)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_patterns_list)


def _add_show(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    show = sub.add_parser(
        "show", parents=[common], help="parameters, provenance, reward and final evaluations"
    )
    show.add_argument("ref", metavar="REF")
    show.add_argument("--png", metavar="FILE", help="also render the pattern's masks to FILE")
    show.add_argument("--shape", type=_shape, metavar="DIMS",
                      help="activation shape for --png: C,H,W (conv, default 1,32,32) or "
                      "T,C (sequence, default 32,64); a built-in's default is its catalog's")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=_patterns_show)


def _add_export(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser("export", parents=[common], help="write a pattern file")
    export.add_argument("ref", metavar="REF")
    export.add_argument("--format", choices=("json", "yaml"),
                        help="file format (default: from -o's suffix, else json)")
    export.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")
    export.set_defaults(handler=_patterns_export)


def _add_import(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    load = sub.add_parser("import", parents=[common], help="validate and store a pattern file")
    load.add_argument("file", metavar="FILE")
    load.add_argument("--json", action="store_true", help="machine-readable output")
    load.set_defaults(handler=_patterns_import)


def _add_tag(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    tag = sub.add_parser("tag", parents=[common], help="point tag NAME at the pattern REF")
    tag.add_argument("ref", metavar="REF")
    tag.add_argument("name", metavar="NAME")
    tag.set_defaults(handler=_patterns_tag)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers like 1,32,32; got {text!r}")
    return dims


TRIAL_FILTERS = ("space", "dataset", "model", "search", "min_reward")


def _patterns_list(args: argparse.Namespace) -> int:
    if args.builtin:
        return _builtin_list(args)
    filters = {name: getattr(args, name) for name in TRIAL_FILTERS}
    with open_store(args) as store:
        ranked = store.best(args.top, kind=args.kind, **filters)
        untried = []
        if len(ranked) < args.top and all(value is None for value in filters.values()):
            untried = store.untried(args.top - len(ranked), kind=args.kind)
    rows = [_ranked_json(hit) for hit in ranked] + [_untried_json(record) for record in untried]
    if args.json:
        return print_json(rows)
    if not rows:
        print("no patterns match" if any(filters.values()) or args.kind else "no patterns stored")
        return 0
    header = ("ID", "HASH", "KIND", "REWARD", "SEARCH", "TRIAL", "SPACE", "DATASET", "MODEL",
              "TAGS")
    keys = ("id", "hash", "kind", "reward", "search", "trial", "space", "dataset", "model")
    body = [(*(_cell(key, row[key]) for key in keys), ",".join(row["tags"])) for row in rows]
    print_table(header, body, right=("ID", "REWARD"))
    return 0


def _ranked_json(hit: Any) -> dict[str, Any]:
    return {"id": hit.record.id, "hash": hit.record.hash, "kind": hit.record.kind,
            "reward": hit.reward, "search": hit.search, "trial": hit.trial_id,
            "space": hit.space, "dataset": hit.dataset, "model": hit.model,
            "tags": list(hit.record.tags)}


def _untried_json(record: Any) -> dict[str, Any]:
    return {"id": record.id, "hash": record.hash, "kind": record.kind, "reward": None,
            "search": None, "trial": None, "space": record.pattern.space, "dataset": None,
            "model": None, "tags": list(record.tags)}


def _cell(key: str, value: Any) -> str:
    if key == "reward":
        return number(value) if value is not None else ""
    if key == "hash":
        return value[:12]
    return "-" if value is None else str(value)


def _builtin_list(args: argparse.Namespace) -> int:
    if args.search is not None or args.min_reward is not None:
        raise BadInput("--builtin: --search and --min-reward filter stored trials; built-in "
                       "patterns have none")
    wanted = {"space": args.space, "dataset": args.dataset, "model": args.model}
    found = [builtin for builtin in builtin_patterns()
             if all(value in (None, getattr(builtin, key)) for key, value in wanted.items())
             and args.kind in (None, builtin.pattern.kind)][: args.top]
    if args.json:
        return print_json([_builtin_json(builtin) for builtin in found])
    if not found:
        print("no built-in patterns match")
        return 0
    print_table(
        ("NAME", "VERSION", "KIND", "SPACE", "DATASET", "MODEL", "VS NONE", "VS BEST FIXED",
         "SUMMARY"),
        [(b.name, str(b.version), b.pattern.kind, b.space, b.dataset, _model_text(b),
          _gain_text(b.test["vs_none"]), _versus_best_text(b.test), b.summary) for b in found],
        right=("VERSION",),
    )
    return 0


def _builtin_json(builtin: BuiltinPattern) -> dict[str, Any]:
    return {**builtin.entry(), "ref": builtin.ref, "kind": builtin.pattern.kind}


def _model_text(builtin: BuiltinPattern) -> str:
    """``wrn (width=1)``: the model and its arguments."""
    args = ", ".join(f"{name}={value_text(value)}" for name, value in builtin.model_args.items())
    return f"{builtin.model} ({args})" if args else builtin.model


def _gain_text(interval: dict[str, float] | None) -> str:
    """``+0.0095 [+0.0010, +0.0180]``: a paired difference and its 95 % t-interval."""
    if interval is None:
        return "not measured"
    return f"{interval['mean']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]"


def _versus_best_text(test: dict[str, Any]) -> str:
    gain = _gain_text(test["vs_best_fixed"])
    return f"{gain} ({test['best_fixed']})" if test["best_fixed"] else gain


def _patterns_show(args: argparse.Namespace) -> int:
    if is_builtin_ref(args.ref):
        return _builtin_show(args)
    with open_store(args) as store:
        record = store.resolve(args.ref)
        trials = store.pattern_trials(record.id)
        evaluations = store.final_evaluations(record.id)
        baselines = [
            evaluation
            for dataset, model in sorted({(e.dataset, e.model) for e in evaluations})
            for evaluation in store.final_evaluations(
                dataset=dataset, model=model, baselines_only=True
            )
        ]
    rewards = [
        trial.reward for trial in trials if trial.status == TrialState.COMPLETED and trial.reward is not None
    ]
    if args.png:
        _render(record.pattern, args.shape, args.png)
    summary = {
        "id": record.id,
        "hash": record.hash,
        "kind": record.kind,
        "space": record.pattern.space,
        "tags": list(record.tags),
        "created_at": record.created_at.isoformat(),
        "pattern": {**record.pattern.to_dict(), "hash": record.hash},
        "best_reward": max(rewards, default=None),
        "trials": [
            {"search": t.search, "trial": t.trial_id, "reward": t.reward, "status": t.status}
            for t in trials
        ],
        "final_evaluations": [_evaluation_json(e) for e in evaluations + baselines],
    }
    if args.json:
        return print_json(summary)
    _print_pattern(summary, record.pattern)
    if args.png:
        print(f"\nmasks rendered to {args.png}")
    return 0


def _builtin_show(args: argparse.Namespace) -> int:
    builtin = resolve_builtin(args.ref)
    if args.png:
        _render(builtin.pattern, args.shape or builtin.map_shape, args.png)
    if args.json:
        return print_json({**_builtin_json(builtin),
                           "pattern": builtin.pattern.to_dict(with_hash=True)})
    _print_builtin(builtin)
    if args.png:
        print(f"\nmasks rendered to {args.png}")
    return 0


def _render(pattern: Any, shape: tuple[int, ...] | None, path: str) -> None:
    from autodropout import render

    try:
        render(pattern, shape or DEFAULT_SHAPES[pattern.kind], path)
    except ValueError as error:
        raise BadInput(f"--shape: {error}") from None
    except OSError as error:
        raise BadInput(f"--png: cannot write {path} ({error.strerror})") from None


def _evaluation_json(evaluation: Any) -> dict[str, Any]:
    subject = "pattern" if evaluation.baseline is None else f"baseline:{evaluation.baseline}"
    return {
        "subject": subject,
        "dataset": evaluation.dataset,
        "model": evaluation.model,
        "metric": evaluation.metric,
        "seed": evaluation.seed,
        "value": evaluation.value,
    }


def _print_pattern(summary: dict[str, Any], pattern: Any) -> None:
    print(f"pattern {summary['id']}  {summary['hash']}")
    print_fields(
        [
            ("kind", summary["kind"]),
            ("space", summary["space"] or "-"),
            ("tags", ", ".join(summary["tags"]) or "-"),
            ("stored", summary["created_at"]),
            ("best reward", number(summary["best_reward"])),
        ]
    )
    _print_sites(pattern)
    trials = summary["trials"]
    print(f"\nprovenance ({len(trials)} trial{'s' if len(trials) != 1 else ''}):")
    if trials:
        print_table(
            ("SEARCH", "TRIAL", "STATUS", "REWARD"),
            [(t["search"], t["trial"], t["status"], number(t["reward"])) for t in trials],
            right=("REWARD",),
            indent="  ",
        )
    print("\nfinal evaluations:")
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for item in summary["final_evaluations"]:
        key = (item["dataset"], item["model"], item["metric"], item["subject"])
        groups.setdefault(key, []).append(item["value"])
    if not groups:
        print("  none")
        return
    print_table(
        ("DATASET", "MODEL", "METRIC", "SUBJECT", "SEEDS", "MEAN", "STD"),
        [
            (
                *key,
                str(len(values)),
                number(statistics.fmean(values)),
                number(statistics.stdev(values)) if len(values) > 1 else "-",
            )
            for key, values in sorted(groups.items(), key=_pattern_first)
        ],
        right=("SEEDS", "MEAN", "STD"),
        indent="  ",
    )


def _print_builtin(builtin: BuiltinPattern) -> None:
    search, test = builtin.search, builtin.test
    print(f"built-in pattern {builtin.ref}  {builtin.hash}")
    print_fields(
        [
            ("kind", builtin.pattern.kind),
            ("summary", builtin.summary),
            ("space", builtin.space),
            ("found on", f"{builtin.dataset}, {_model_text(builtin)}"),
            ("map shape", "x".join(map(str, builtin.map_shape))),
            ("search", f"{search['name']} ({search['controller']}, seed {search['seed']}, "
                       f"{search['trials']} trials)"),
            ("validation", f"{builtin.validation['metric']} {number(builtin.validation['value'])}"),
            ("test", _test_text(test)),
            ("vs none", _gain_text(test["vs_none"])),
            ("vs best fixed", _versus_best_text(test)),
            ("report", builtin.report),
        ]
    )
    _print_sites(builtin.pattern)


def _test_text(test: dict[str, Any]) -> str:
    """``test_accuracy 0.8300 (std 0.0040, seeds 0,1,2)``, or ``not measured``."""
    if test["mean"] is None:
        return "not measured"
    return (f"{test['metric']} {number(test['mean'])} (std {number(test['std'])}, seeds "
            f"{','.join(map(str, test['seeds']))})")


def _print_sites(pattern: Any) -> None:
    print(f"\nsites ({len(pattern.sites)}):")
    places = pattern.placement or (None,) * len(pattern.sites)
    for index, (site, place) in enumerate(zip(pattern.sites, places)):
        values = " ".join(f"{name}={value_text(value)}" for name, value in site.items())
        print(f"  [{index}] {_place_text(place)}{values}")


def _place_text(place: Any) -> str:
    """``stage1 on group1.*.bn* (28x28): `` for a site's placement, ``""`` without one."""
    if place is None:
        return ""
    where = f" on {place.modules}" if place.modules else ""
    size = f" ({place.map_size[0]}x{place.map_size[1]})" if place.map_size else ""
    return f"{place.name}{where}{size}: "


def _pattern_first(item: tuple[tuple[str, ...], list[float]]) -> tuple:
    (dataset, model, metric, subject), _ = item
    return dataset, model, metric, subject != "pattern", subject


def _patterns_export(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        text = store.export(args.ref, args.format, args.output)
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _patterns_import(args: argparse.Namespace) -> int:
    from autodropout.patterns.files import read_pattern_file

    pattern = read_pattern_file(args.file)  # refused files never open the store
    with open_store(args, create=True) as store:
        record = store.add_pattern(pattern)
    if args.json:
        return print_json(
            {"id": record.id, "hash": record.hash, "kind": record.kind, "tags": list(record.tags)}
        )
    print(f"imported pattern {record.id}  {record.hash}")
    return 0


def _patterns_tag(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        record = store.tag(args.ref, args.name)
    print(f"tag {args.name} -> pattern {record.id}  {record.hash}")
    return 0


