"""``autodropout train``: final training of a pattern or a baseline, scored on the test split.

Trains on the training split (all of it unless ``--train-examples``), evaluates on the test
split for each seed, prints mean and standard deviation, and stores every seed's test
metric in the pattern store as a final evaluation of the pattern or the baseline.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_SPACES = {"wrn": "convnet", "gpt": "transformer"}
PATTERN_KINDS = {"wrn": "conv", "gpt": "sequence"}
# workers.regularizers.BASELINE_FORMS, written out so that building the parser imports no torch
BASELINE_HELP = ("none, dropout:P, spatial:P, dropblock:P[:SIZE], droppath:P, gaussian:P, "
                 "jumpout[:PMAX]")


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train with a pattern or a baseline on the training split, score on the test split",
        description="Final evaluation: train the child model with a stored pattern or a fixed "
        "dropout baseline for several seeds, evaluate on the test split, report mean and "
        "standard deviation, and store every result.",
    )
    train.add_argument("--dataset", required=True, help="dataset, e.g. fashion-mnist or ptb")
    train.add_argument("--model", required=True, choices=tuple(DEFAULT_SPACES),
                       help="child model: wrn (images) or gpt (text)")
    train.add_argument("--regularizer", required=True, metavar="REF",
                       help="a pattern (tag, id, hash prefix or file) or a baseline: "
                       + BASELINE_HELP)
    train.add_argument("--epochs", type=int, help="epochs (default: the space's budget)")
    train.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    train.add_argument("--train-examples", type=int, metavar="N",
                       help="train on a random N of the training split (text: the first N "
                       "tokens; default: all of it)")
    train.add_argument("--space", help="space whose budget (and sites, for a pattern) to use "
                       "(default: the pattern's space, else convnet for wrn, transformer for gpt)")
    train.add_argument("--db", help="pattern store URL (default: $AUTODROPOUT_DB or the local "
                       "SQLite file)")
    train.add_argument("--data-dir", help="dataset folder (default: $AUTODROPOUT_DATA_DIR or "
                       "download)")
    train.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from patterns_db import PatternStore
    from workers.final import metric_name, summarize, train_final, training_subset
    from workers.regularizers import check_model, parse_regularizer

    from .output import print_table

    check_counts(args)
    baseline = parse_regularizer(args.regularizer)
    if baseline is not None:
        check_model(baseline, "gpt" if args.model == "gpt" else "wide_resnet")
    with PatternStore(args.db) as store:
        pattern = None if baseline is not None else resolve_pattern(args, store)
        space = choose_space(args, pattern)
        bundle = load_data(args)
        budget = make_budget(args, space, bundle)
        train = training_subset(bundle.train, args.train_examples)
        site_modules = space.site_modules if pattern and len(pattern) == space.num_sites else ()
        subject = str(baseline) if baseline is not None else f"pattern {pattern.hash[:12]}"
        device = args.device or default_device()
        print(f"training {args.model} on {args.dataset} ({len(train)} training examples, "
              f"{len(bundle.test)} test) with {subject}: {plural(budget.epochs, 'epoch')}, "
              f"seeds 0-{args.seeds - 1}, {device}")
        results = []
        for seed in range(args.seeds):
            with EpochBar(seed, budget.epochs, args.quiet) as bar:
                result = train_final(bundle, budget, baseline or pattern, seed, train=train,
                                     site_modules=site_modules, device=device, report=bar.update)
            results.append(result)
            if is_storable(result.value):
                link = {"baseline": str(baseline)} if baseline is not None else {"pattern": pattern}
                store.add_final_evaluation(args.dataset, args.model, seed, result.metric,
                                           result.value, **link)
        metric = metric_name(bundle)
        stored = [r for r in results if is_storable(r.value)]
        print_table(
            ("SEED", metric.upper(), "TEST_LOSS", "EPOCHS", "SECONDS", "NOTE"),
            [(str(r.seed), f"{r.value:.4f}", f"{r.test_loss:.4f}", str(r.epochs),
              f"{r.seconds:.0f}", note(r)) for r in results],
            right=(metric.upper(), "TEST_LOSS", "EPOCHS", "SECONDS"),
        )
        mean, std = summarize([r.value for r in stored])
        spread = "-" if std != std else f"{std:.4f}"
        print(f"{metric}: mean {mean:.4f}, std {spread} over {plural(len(stored), 'seed')}")
        print(f"stored {plural(len(stored), 'final evaluation')} of {subject} in {store.url}")
    return 0


def check_counts(args: argparse.Namespace) -> None:
    from autodropout.errors import BadInput

    for flag, value in (("--seeds", args.seeds), ("--epochs", args.epochs),
                        ("--train-examples", args.train_examples)):
        if value is not None and value < 1:
            raise BadInput(f"{flag}: must be at least 1, got {value}")


def resolve_pattern(args: argparse.Namespace, store: Any):
    """The pattern ``--regularizer`` names: a file, else a tag, id or hash prefix in the store."""
    from autodropout.errors import BadInput, NotFound
    from autodropout.patterns.files import read_pattern_file
    from workers.regularizers import BASELINE_FORMS, is_pattern_file

    ref = args.regularizer.strip()
    if is_pattern_file(ref):
        pattern = read_pattern_file(ref)
    else:
        try:
            pattern = store.resolve(ref).pattern
        except NotFound as error:
            raise NotFound(f"--regularizer: {error} in {store.url} (a baseline is one of "
                           f"{', '.join(BASELINE_FORMS)})") from None
    if pattern.kind != PATTERN_KINDS[args.model]:
        raise BadInput(f"--regularizer: {ref!r} is a {pattern.kind} pattern; the {args.model} "
                       f"model takes {PATTERN_KINDS[args.model]} patterns")
    return pattern


def choose_space(args: argparse.Namespace, pattern: Any):
    """``--space``, else the pattern's own space, else the model's shipped space."""
    import search_spaces

    if args.space:
        return search_spaces.load(args.space)
    if pattern is not None and pattern.space:
        try:
            return search_spaces.load(pattern.space)
        except search_spaces.SpaceError:
            print(f"autodropout: the pattern's space {pattern.space!r} is not shipped; using "
                  f"{DEFAULT_SPACES[args.model]!r} (pass --space to choose)", file=sys.stderr)
    return search_spaces.load(DEFAULT_SPACES[args.model])


def load_data(args: argparse.Namespace):
    from autodropout.errors import BadInput
    from workers.datasets import LOADERS, load_dataset

    if args.dataset not in LOADERS:
        raise BadInput(f"--dataset: unknown dataset {args.dataset!r}; known: "
                       f"{', '.join(sorted(LOADERS))}")
    try:
        bundle = load_dataset(args.dataset, args.data_dir)
    except (OSError, ValueError) as error:
        raise BadInput(f"--dataset {args.dataset}: {error}") from None
    needs = "text" if args.model == "gpt" else "image"
    if bundle.kind != needs:
        raise BadInput(f"--model {args.model} needs a {needs} dataset; {args.dataset} is "
                       f"{bundle.kind}")
    return bundle


def make_budget(args: argparse.Namespace, space: Any, bundle: Any):
    from autodropout.errors import BadInput
    from workers.training import Budget

    overrides = {"dataset": args.dataset, "model": args.model}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    try:
        return Budget.from_mapping(space.budget, **overrides)
    except ValueError as error:
        raise BadInput(f"--space {space.name}: {error}") from None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def is_storable(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def note(result: Any) -> str:
    if not is_storable(result.value):
        return "diverged, not stored"
    return "diverged" if result.diverged else ""


class EpochBar:
    """A progress bar over one seed's epochs, showing the last training loss and the fit to
    the monitored training examples (accuracy or perplexity)."""

    def __init__(self, seed: int, epochs: int, quiet: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=epochs, desc=f"seed {seed}", unit="epoch", disable=quiet,
                         dynamic_ncols=True, leave=False)

    def update(self, metrics: dict[str, Any]) -> None:
        fit = {"train_acc": metrics["val_accuracy"]} if "val_accuracy" in metrics \
            else {"train_ppl": metrics["val_perplexity"]}
        self._bar.set_postfix(loss=f"{metrics['train_loss']:.4f}",
                              **{name: f"{value:.4f}" for name, value in fit.items()},
                              refresh=False)
        self._bar.update(1)

    def __enter__(self) -> EpochBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.close()
