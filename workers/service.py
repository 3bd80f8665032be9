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

from autodropout.builtin import BuiltinPattern, is_builtin_ref, resolve_builtin
from autodropout.errors import BadInput, NotFound
from autodropout.patterns import Pattern
from autodropout.patterns.files import is_pattern_file, read_pattern_file
from autodropout.validation import check_int

from .baselines import BASELINE_FORMS, Baseline, check_model, parse_regularizer
from .final import FinalResult, metric_name, summarize, train_final, training_subset
from .registry import DATASETS, MODEL_DATA, MODEL_PATTERNS, MODEL_SPACES, MODELS


@dataclass
class TrainOptions:
    """The settings of one final training; ``None`` means the space's ``budget:`` default.

    ``space``: default, a built-in pattern's catalog space, else the space of the search
    that found the pattern (its best trial's search, as the store kept it), else the
    pattern's shipped space, else the model's shipped space
    (:data:`~workers.registry.MODEL_SPACES`). ``model``: default, that space's
    ``budget.model``, else the model for the dataset's kind (image: wrn, text: gpt).
    """

    dataset: str
    regularizer: str
    model: str | None = None
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
    """The baseline's reference, or ``pattern HASH12`` (and a built-in's ref)."""
    model: str
    dataset: str
    train_examples: int
    test_examples: int
    epochs: int
    seeds: int
    device: str
    space: str = ""
    """Where the budget (and a pattern's sites) came from, e.g. ``space 'tiny'``."""


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
    builtin = find_builtin(options.regularizer)
    space_name = options.space or (builtin.space if builtin else None)
    given_space = load_space(space_name) if space_name else None
    if baseline is not None and options.model:
        check_model(baseline, MODELS.canonical(options.model))
    with PatternStore(options.db) as store:
        if baseline is not None:
            pattern = None
        else:
            pattern = builtin.pattern if builtin else resolve_pattern(options, store)
        space = given_space or pattern_space(pattern, store)
        model, bundle = choose_model(options, space)
        if baseline is not None:
            check_model(baseline, model)
        else:
            check_pattern_kind(pattern, model, options.regularizer)
        bundle = bundle or load_data(options.dataset, options.data_dir)
        check_data(bundle, model, options)
        if space is None:
            space = fallback_space(model, pattern, store, report)
        budget = make_budget(options, space, model)
        train = training_subset(bundle.train, options.train_examples)
        site_modules = space.site_modules if pattern and len(pattern) == space.num_sites else ()
        plan = TrainPlan(
            subject=describe_subject(baseline, pattern, builtin),
            model=model, dataset=options.dataset, train_examples=len(train),
            test_examples=len(bundle.test), epochs=budget.epochs, seeds=options.seeds,
            device=options.device or default_device(), space=describe_space(space))
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
                store_result(store, options.dataset, model, baseline or pattern, result)
        return outcome


def check_options(options: TrainOptions) -> None:
    if options.model is not None:
        MODELS.canonical(options.model)
    DATASETS.canonical(options.dataset)
    for flag, value in (("--seeds", options.seeds), ("--epochs", options.epochs),
                        ("--train-examples", options.train_examples)):
        if value is not None:
            check_int(value, flag, low=1, error=BadInput)


def find_builtin(ref: str) -> BuiltinPattern | None:
    """The built-in pattern ``builtin:NAME[@VERSION]`` names; ``None`` for any other ref."""
    if not is_builtin_ref(ref):
        return None
    try:
        return resolve_builtin(ref)
    except NotFound as error:
        raise NotFound(f"--regularizer: {error}") from None


def resolve_pattern(options: TrainOptions, store: Any) -> Pattern:
    """The pattern ``regularizer`` names: a file, else a tag, id or hash prefix in the store."""
    ref = options.regularizer.strip()
    if is_pattern_file(ref):
        return read_pattern_file(ref)
    try:
        return store.resolve(ref).pattern
    except NotFound as error:
        raise NotFound(f"--regularizer: {error} in {store.url} (a baseline is one of "
                       f"{', '.join(BASELINE_FORMS)})") from None


def check_pattern_kind(pattern: Pattern, model: str, ref: str) -> None:
    wanted = MODEL_PATTERNS[model]
    if pattern.kind != wanted:
        raise BadInput(f"--regularizer: {ref.strip()!r} is a {pattern.kind} pattern; the {model} "
                       f"model takes {wanted} patterns")


def load_space(name_or_path: str):
    import search_spaces

    return search_spaces.load(name_or_path)


def pattern_space(pattern: Pattern | None, store: Any):
    """The space the pattern was found in: the one of the search of its best trial (as that
    search stored it), else its space by name when that is a shipped space; ``None`` when
    neither is known (a baseline, a pattern no search tried whose space is not shipped)."""
    import search_spaces

    if pattern is None:
        return None
    search = finding_search(pattern, store)
    if search is not None:
        record = store.get_search(search)
        return search_spaces.parse(record.space_yaml, source=f"search {record.name!r}")
    if pattern.space and pattern.space in search_spaces.available():
        return search_spaces.load(pattern.space)
    return None


def finding_search(pattern: Pattern, store: Any) -> str | None:
    """The name of the search of the pattern's best trial, ``None`` if no search tried it."""
    try:
        record = store.resolve(pattern.hash)
    except NotFound:
        return None
    if record.hash != pattern.hash:
        return None
    trials = store.pattern_trials(record.id)  # best first
    return trials[0].search if trials else None


def describe_subject(baseline: Baseline | None, pattern: Pattern | None,
                     builtin: BuiltinPattern | None) -> str:
    if baseline is not None:
        return str(baseline)
    return f"pattern {pattern.hash[:12]}" + (f" ({builtin.ref})" if builtin else "")


def describe_space(space: Any) -> str:
    source = space.source
    return f"space {space.name!r}" + (f" of {source}" if source.startswith("search ") else "")


def choose_model(options: TrainOptions, space: Any):
    """``(model, bundle)``: ``--model``, else the space's ``budget.model``, else the model of
    the dataset's kind (``bundle`` is the dataset when it had to be loaded to tell, else
    ``None``)."""
    if options.model:
        return MODELS.canonical(options.model), None
    if space is not None and space.budget.get("model"):
        return MODELS.canonical(space.budget["model"]), None
    bundle = load_data(options.dataset, options.data_dir)
    models = {kind: model for model, kind in MODEL_DATA.items()}
    return models[bundle.kind], bundle


def load_data(dataset: str, data_dir: str | None):
    from .datasets import load_dataset

    DATASETS.canonical(dataset)
    try:
        return load_dataset(dataset, data_dir)
    except (OSError, ValueError) as error:
        raise BadInput(f"--dataset {dataset}: {error}") from None


def check_data(bundle: Any, model: str, options: TrainOptions) -> None:
    needs = MODEL_DATA[model]
    if bundle.kind != needs:
        flag = f"--model {options.model}" if options.model else \
            f"the model {model} (the space's budget.model; pass --model)"
        article = "an" if needs[0] in "aeiou" else "a"
        raise BadInput(f"{flag} needs {article} {needs} dataset; {options.dataset} is "
                       f"{bundle.kind}")


def fallback_space(model: str, pattern: Pattern | None, store: Any, report: TrainReport):
    """The model's shipped space, for a baseline or a pattern whose own space is unknown."""
    import search_spaces

    default = MODEL_SPACES[model]
    if pattern is not None and pattern.space:
        report.note(f"no search in {store.url} tried the pattern and its space "
                    f"{pattern.space!r} is not shipped; using the budget and sites of space "
                    f"{default!r} (pass --space to choose)")
    return search_spaces.load(default)


def make_budget(options: TrainOptions, space: Any, model: str):
    from .training import Budget

    overrides = {"dataset": options.dataset, "model": model}
    if options.epochs is not None:
        overrides["epochs"] = options.epochs
    try:
        return Budget.from_mapping(space.budget, **overrides)
    except ValueError as error:
        raise BadInput(f"--space {space.name}: {error}") from None


def store_result(store: Any, dataset: str, model: str, regularizer: Baseline | Pattern,
                 result: FinalResult) -> None:
    link = {"baseline": str(regularizer)} if isinstance(regularizer, Baseline) \
        else {"pattern": regularizer}
    store.add_final_evaluation(dataset, model, result.seed, result.metric, result.value, **link)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def is_storable(value: float) -> bool:
    return value == value and abs(value) != float("inf")
