"""The train service: final training of a pattern or a baseline, scored on the test split.

``run_training(TrainOptions(...))`` is what ``autodropout train`` runs: it trains on the
training split (all of it unless ``train_examples``), evaluates on the test split for each
seed, and stores every seed's test metric in the pattern store as a final evaluation of the
pattern or the baseline. Every :class:`~autodropout.errors.BadInput` check runs before
anything is written. Progress goes to a :class:`TrainReport`; nothing here prints. No Ray.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from autodropout.errors import BadInput, NotFound
from autodropout.patterns import Pattern
from autodropout.patterns.files import is_pattern_file, read_pattern_file
from autodropout.validation import check_int

from .baselines import BASELINE_FORMS, Baseline, check_model, parse_regularizer
from .final import FinalResult, metric_name, summarize, train_final, training_subset
from .registry import DATASETS, MODEL_DATA, MODEL_PATTERNS, MODEL_SPACES, MODELS


@dataclass
class TrainOptions:
    """The settings of one final training; ``None`` means the space's ``budget:`` default
    (``space``: the pattern's own space, else the model's shipped space)."""

    dataset: str
    model: str
    regularizer: str
    epochs: int | None = None
    seeds: int = 3
    train_examples: int | None = None
    space: str | None = None
    db: str | None = None
    data_dir: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class TrainPlan:
    """What is about to be trained, known once the input is checked."""

    subject: str
    """The baseline's reference, or ``pattern HASH12``."""
    model: str
    dataset: str
    train_examples: int
    test_examples: int
    epochs: int
    seeds: int
    device: str


@dataclass
class TrainResult:
    plan: TrainPlan
    metric: str
    """``test_accuracy`` (images) or ``test_perplexity`` (text)."""
    results: list[FinalResult] = field(default_factory=list)
    store_url: str = ""

    @property
    def stored(self) -> list[FinalResult]:
        """The seeds whose score was finite, hence stored."""
        return [result for result in self.results if is_storable(result.value)]

    def summary(self) -> tuple[float, float]:
        """Mean and sample standard deviation of the stored scores."""
        return summarize([result.value for result in self.stored])


class TrainReport:
    """Receives progress; the default ignores it and turns notes into warnings."""

    def start(self, plan: TrainPlan) -> None:
        """The input is checked and training starts."""

    def epoch(self, seed: int, metrics: dict[str, Any]) -> None:
        """One epoch of seed ``seed`` ended (the metrics of :func:`~workers.training.train_child`)."""

    def seed_done(self, seed: int, result: FinalResult | None) -> None:
        """Seed ``seed`` ended (``None``: it raised)."""

    def note(self, message: str) -> None:
        warnings.warn(message, stacklevel=2)


def run_training(options: TrainOptions, report: TrainReport | None = None) -> TrainResult:
    from patterns_db import PatternStore

    report = report or TrainReport()
    check_options(options)
    baseline = parse_regularizer(options.regularizer)
    if baseline is not None:
        check_model(baseline, MODELS.canonical(options.model))
    with PatternStore(options.db) as store:
        pattern = None if baseline is not None else resolve_pattern(options, store)
        space = choose_space(options, pattern, report)
        bundle = load_data(options)
        budget = make_budget(options, space)
        train = training_subset(bundle.train, options.train_examples)
        site_modules = space.site_modules if pattern and len(pattern) == space.num_sites else ()
        plan = TrainPlan(
            subject=str(baseline) if baseline is not None else f"pattern {pattern.hash[:12]}",
            model=options.model, dataset=options.dataset, train_examples=len(train),
            test_examples=len(bundle.test), epochs=budget.epochs, seeds=options.seeds,
            device=options.device or default_device())
        report.start(plan)
        outcome = TrainResult(plan, metric_name(bundle), store_url=store.url)
        for seed in range(options.seeds):
            result = None
            try:
                result = train_final(bundle, budget, baseline or pattern, seed, train=train,
                                     site_modules=site_modules, device=plan.device,
                                     report=lambda metrics, seed=seed: report.epoch(seed, metrics))
            finally:
                report.seed_done(seed, result)
            outcome.results.append(result)
            if is_storable(result.value):
                store_result(store, options, baseline or pattern, result)
        return outcome


def check_options(options: TrainOptions) -> None:
    MODELS.canonical(options.model)
    for flag, value in (("--seeds", options.seeds), ("--epochs", options.epochs),
                        ("--train-examples", options.train_examples)):
        if value is not None:
            check_int(value, flag, low=1, error=BadInput)


def resolve_pattern(options: TrainOptions, store: Any) -> Pattern:
    """The pattern ``regularizer`` names: a file, else a tag, id or hash prefix in the store."""
    ref = options.regularizer.strip()
    if is_pattern_file(ref):
        pattern = read_pattern_file(ref)
    else:
        try:
            pattern = store.resolve(ref).pattern
        except NotFound as error:
            raise NotFound(f"--regularizer: {error} in {store.url} (a baseline is one of "
                           f"{', '.join(BASELINE_FORMS)})") from None
    wanted = MODEL_PATTERNS[MODELS.canonical(options.model)]
    if pattern.kind != wanted:
        raise BadInput(f"--regularizer: {ref!r} is a {pattern.kind} pattern; the {options.model} "
                       f"model takes {wanted} patterns")
    return pattern


def choose_space(options: TrainOptions, pattern: Pattern | None, report: TrainReport):
    """``space``, else the pattern's own space, else the model's shipped space."""
    import search_spaces

    if options.space:
        return search_spaces.load(options.space)
    default = MODEL_SPACES[MODELS.canonical(options.model)]
    if pattern is not None and pattern.space:
        try:
            return search_spaces.load(pattern.space)
        except search_spaces.SpaceError:
            report.note(f"the pattern's space {pattern.space!r} is not shipped; using "
                        f"{default!r} (pass --space to choose)")
    return search_spaces.load(default)


def load_data(options: TrainOptions):
    from .datasets import load_dataset

    DATASETS.canonical(options.dataset)
    try:
        bundle = load_dataset(options.dataset, options.data_dir)
    except (OSError, ValueError) as error:
        raise BadInput(f"--dataset {options.dataset}: {error}") from None
    needs = MODEL_DATA[MODELS.canonical(options.model)]
    if bundle.kind != needs:
        raise BadInput(f"--model {options.model} needs a {needs} dataset; {options.dataset} is "
                       f"{bundle.kind}")
    return bundle


def make_budget(options: TrainOptions, space: Any):
    from .training import Budget

    overrides = {"dataset": options.dataset, "model": options.model}
    if options.epochs is not None:
        overrides["epochs"] = options.epochs
    try:
        return Budget.from_mapping(space.budget, **overrides)
    except ValueError as error:
        raise BadInput(f"--space {space.name}: {error}") from None


def store_result(store: Any, options: TrainOptions, regularizer: Baseline | Pattern,
                 result: FinalResult) -> None:
    link = {"baseline": str(regularizer)} if isinstance(regularizer, Baseline) \
        else {"pattern": regularizer}
    store.add_final_evaluation(options.dataset, options.model, result.seed, result.metric,
                               result.value, **link)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def is_storable(value: float) -> bool:
    return value == value and abs(value) != float("inf")
