"""``autodropout train``: final training of a pattern or a baseline, scored on the test split.

Parses the flags, runs :func:`workers.service.run_training` (which trains on the training
split, evaluates on the test split for each seed and stores every seed's test metric) and
renders its progress bars and result table. Building the parser imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from workers.baselines import BASELINE_FORMS
from workers.registry import MODELS


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train with a pattern or a baseline on the training split, score on the test split",
        description="Final evaluation: train the child model with a pattern or a fixed "
        "dropout baseline for several seeds, evaluate on the test split, report mean and "
        "standard deviation, and store every result.",
    )
    train.add_argument("--dataset", required=True, help="dataset, e.g. fashion-mnist or ptb")
    train.add_argument("--model", choices=MODELS.names(),
                       help="child model: wrn (images) or gpt (text) (default: the space's "
                       "budget model, else the one for the dataset's kind)")
    train.add_argument("--regularizer", required=True, metavar="REF",
                       help="a pattern (tag, id, hash prefix, file, or builtin:NAME for a "
                       "built-in one: see 'patterns list --builtin') or a baseline: "
                       + ", ".join(BASELINE_FORMS))
    train.add_argument("--epochs", type=int, help="epochs (default: the space's budget)")
    train.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    train.add_argument("--train-examples", type=int, metavar="N",
                       help="train on a random N of the training split (text: the first N "
                       "tokens; default: all of it)")
    train.add_argument("--space", help="space whose budget (and sites, for a pattern) to use "
                       "(default: a built-in pattern's catalog space, else the space of the "
                       "search that found the pattern, else the pattern's shipped space, else "
                       "convnet for wrn, transformer for gpt)")
    train.add_argument("--db", help="pattern store URL (default: $AUTODROPOUT_DB or the local "
                       "SQLite file)")
    train.add_argument("--data-dir", help="dataset folder (default: $AUTODROPOUT_DATA_DIR or "
                       "download)")
    train.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from workers.service import TrainOptions, run_training

    options = TrainOptions(
        dataset=args.dataset, model=args.model, regularizer=args.regularizer, epochs=args.epochs,
        seeds=args.seeds, train_examples=args.train_examples, space=args.space, db=args.db,
        data_dir=args.data_dir, device=args.device)
    outcome = run_training(options, ProgressReport(args.quiet))
    render(outcome)
    return 0


def render(outcome: Any) -> None:
    """The table of seeds, their mean and spread, and where they were stored."""
    from .output import print_table

    metric = outcome.metric.upper()
    print_table(
        ("SEED", metric, "TEST_LOSS", "EPOCHS", "SECONDS", "NOTE"),
        [(str(r.seed), f"{r.value:.4f}", f"{r.test_loss:.4f}", str(r.epochs),
          f"{r.seconds:.0f}", note(r)) for r in outcome.results],
        right=(metric, "TEST_LOSS", "EPOCHS", "SECONDS"),
    )
    mean, std = outcome.summary()
    spread = "-" if std != std else f"{std:.4f}"
    stored = len(outcome.stored)
    print(f"{outcome.metric}: mean {mean:.4f}, std {spread} over {plural(stored, 'seed')}")
    print(f"stored {plural(stored, 'final evaluation')} of {outcome.plan.subject} in "
          f"{outcome.store_url}")


class ProgressReport:
    """Prints what is trained, then one :class:`EpochBar` per seed (see
    :class:`workers.service.TrainReport`)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: EpochBar | None = None

    def start(self, plan: Any) -> None:
        print(f"training {plan.model} on {plan.dataset} ({plan.train_examples} training examples, "
              f"{plan.test_examples} test) with {plan.subject}: {plural(plan.epochs, 'epoch')}, "
              f"seeds 0-{plan.seeds - 1}, {plan.device}"
              + (f"; budget of {plan.space}" if plan.space else ""))

    def epoch(self, seed: int, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            self.bar = EpochBar(seed, metrics["epochs"], self.quiet)
        self.bar.update(metrics)

    def seed_done(self, seed: int, result: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def note(self, message: str) -> None:
        print(f"autodropout: {message}", file=sys.stderr)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def note(result: Any) -> str:
    from workers.service import is_storable

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

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> EpochBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
