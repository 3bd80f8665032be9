"""Pre-flight checks of a search: everything a trial would reject, checked on the driver.

Before Ray starts and before anything is written, :mod:`controller.service` runs these on
the options and the space: the model and dataset names and kinds, the budget against the
dataset's size, the dataset's files, and every site's ``modules:`` glob and pattern against
the child model, built once on the meta device. Each failure is one
:class:`~autodropout.errors.BadInput` naming the flag, or the space file, line and key.
``options`` is a :class:`~controller.service.SearchOptions` (read here, never changed).
"""

from __future__ import annotations

from typing import Any

from autodropout.errors import BadInput


def check_space(space, dataset: str | None = None, model: str | None = None,
                require: bool = True) -> tuple[str | None, str | None]:
    """The canonical (dataset, model) that ``space`` trains (``dataset``/``model`` override its
    ``budget:``), or the :class:`BadInput` naming the flag or the space file, line and key.
    ``require=False`` lets a space leave them out (``None``).

    Cheap (no torch, no data): ``autodropout spaces show`` can call it as well.
    """
    from search_spaces.loader import location
    from workers.registry import DATASETS, MODEL_PATTERNS, MODELS

    chosen = []
    for flag, given, key, registry in (("--dataset", dataset, "budget.dataset", DATASETS),
                                       ("--model", model, "budget.model", MODELS)):
        value = given or space.budget.get(key.split(".")[1])
        if value is None and not require:
            chosen.append(None)
            continue
        if value is None:
            raise BadInput(f"{location(space, key)}: missing (or pass {flag})")
        chosen.append(registry.canonical(value, flag if given else location(space, key)))
    wanted = MODEL_PATTERNS[chosen[1]] if chosen[1] else space.kind
    if space.kind != wanted:
        where = "--model" if model else location(space, "budget.model")
        raise BadInput(f"{where}: the {chosen[1]} model takes {wanted} patterns; space "
                       f"{space.name!r} ({space.source}) has {space.kind} patterns")
    return chosen[0], chosen[1]


def make_budget(options: Any, space, dataset: str, model: str) -> dict[str, Any]:
    """The budget every trial trains with: the space's, with the options' overrides."""
    budget = {**space.budget, "dataset": dataset, "model": model}
    if options.epochs is not None:
        budget["epochs"] = options.epochs
    if options.train_examples is not None:
        budget["train_examples"] = options.train_examples
    return budget


BUDGET_FLAGS = {"epochs": "--epochs", "train_examples": "--train-examples",
                "dataset": "--dataset", "model": "--model"}


def budget_field(options: Any, space, key: str) -> str:
    """What names budget ``key`` in an error: its flag when the options set it, else the
    space file, line and key."""
    from search_spaces.loader import location

    flag = BUDGET_FLAGS.get(key)
    if flag and getattr(options, flag.removeprefix("--").replace("-", "_")) is not None:
        return flag
    return location(space, f"budget.{key}")


def load_data(options: Any, dataset: str):
    """The dataset, loaded once on the driver (trials share it): a missing or corrupt file
    is a one-line :class:`BadInput` naming it."""
    from workers.datasets import load_dataset

    try:
        return load_dataset(dataset, data_dir=options.data_dir)
    except (OSError, ValueError, EOFError) as error:
        text = str(error).strip().splitlines()
        raise BadInput(f"--dataset {dataset}: {text[0] if text else type(error).__name__}") \
            from None


def check_trial_setup(space, budget: dict[str, Any], data, seed: int,
                      options: Any) -> None:
    """Everything a trial would reject, checked once on the driver: the budget (keys, sizes
    against ``data``'s training split), the model's kind of data, and every site's module
    selector against the child model (built on the meta device)."""
    from workers.registry import MODEL_DATA, MODELS
    from workers.training import Budget

    def fail(key: str, problem: str) -> BadInput:
        return BadInput(f"{budget_field(options, space, key)}: {problem}")

    try:
        checked = Budget.from_mapping(budget)
    except ValueError as error:
        message = str(error).removeprefix("budget: ")
        key = next((name for name in budget_keys() if message.startswith(name)), None)
        if key is not None:
            raise fail(key, message.removeprefix(key).lstrip(" :")) from None
        raise BadInput(f"{space.source}: budget: {message}") from None
    model = MODELS.canonical(checked.model)
    if data.kind != MODEL_DATA[model]:
        raise fail("model", f"the {model} model trains on {MODEL_DATA[model]} data; "
                            f"{data.name} is a {data.kind} dataset")
    check_sizes(checked, data, fail)
    check_sites(space, checked, data, seed, fail)


def budget_keys() -> tuple[str, ...]:
    from dataclasses import fields

    from workers.training import Budget

    return tuple(sorted((f.name for f in fields(Budget)), key=len, reverse=True))


def check_sizes(budget, data, fail) -> None:
    total = len(data.train)
    unit = "tokens" if data.kind == "text" else "examples"
    if budget.validation_examples >= total:
        raise fail("validation_examples", f"{budget.validation_examples} is more than the "
                   f"{total - 1} {unit} {data.name}'s training split can hold out ({total} in all)")
    available = total - budget.validation_examples
    if budget.train_examples > available:
        raise fail("train_examples", f"{budget.train_examples} is more than the {available} "
                   f"{unit} left in {data.name}'s training split ({total}) after "
                   f"validation_examples ({budget.validation_examples})")
    if data.kind == "text":
        for key in ("train_examples", "validation_examples"):
            if getattr(budget, key) <= budget.context:
                raise fail(key, f"{getattr(budget, key)} tokens do not fill one window of "
                                f"context ({budget.context}) tokens")


def check_sites(space, budget, data, seed: int, fail) -> None:
    """Apply probe patterns (together they take every choice of every decision) to the
    child model, as each trial does, and remove them again."""
    import fnmatch

    import torch

    from autodropout.patterns import apply_pattern
    from search_spaces.loader import location
    from workers.training import build_child, site_selectors

    try:
        with torch.device("meta"):
            model = build_child(budget, data, seed)
    except (ValueError, TypeError) as error:
        raise fail("model", str(error).removeprefix("budget: ")) from None
    names = [name for name, _ in model.named_modules() if name]
    for index, glob in enumerate(space.site_modules):
        if glob and not any(fnmatch.fnmatchcase(name, glob) for name in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise BadInput(f"{location(space, f'sites[{index}].modules')}: {glob!r} matches no "
                           f"module of the {budget.model} child model (modules: {shown})")
    decisions = space.decisions
    widest = max((len(decision.choices) for decision in decisions), default=1)
    probes = {}
    for k in range(widest):
        pattern = space.decode([k % len(decision.choices) for decision in decisions])
        probes.setdefault(pattern.hash, pattern)
    for pattern in probes.values():
        try:
            apply_pattern(model, pattern, site_selectors(pattern, space.site_modules)).remove()
        except ValueError as error:
            raise BadInput(f"{location(space, 'sites')}: {error} (the {budget.model} child "
                           "model)") from None
