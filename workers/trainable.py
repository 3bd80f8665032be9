"""The Ray Tune function trainable: train one child model with one proposed pattern.

``config`` (from the searcher, plus constants of the search):

* ``pattern``: the pattern's canonical JSON (required);
* ``space``: a shipped space name or a YAML path (default: the pattern's ``space``), read
  by the trial itself when the trainable holds no parsed space (a relative path is looked
  up from the trial's working directory, so a search passes the parsed space instead, see
  :func:`make_trainable`);
* ``budget``: overrides of the space's ``budget:`` section;
* ``model_args``: extra keyword arguments of the child model (e.g. ``{"width": 1}``);
* ``site_modules``: per-site module globs overriding the space's ``modules:``;
* ``seed`` (model initialisation, batch order and masks; default 0), ``split_seed``
  (the validation hold-out, default 0: the same for every trial so rewards compare);
* ``validate_at``: epochs to validate at besides the budget's ``eval_every`` (a scheduler's
  rungs, so ASHA compares trials on fresh rewards);
* ``data_dir`` and ``download`` (default true): where the dataset's files are and whether
  they may be downloaded, when the trial loads them itself.

Every validated epoch is reported with ``ray.tune.report``: the metrics of
:func:`workers.training.train_child` plus ``node``, ``pid`` (the worker process),
``device``, ``threads``, ``pattern_hash`` and ``duration`` (seconds since the trial
started). The last report has ``final: True`` and the trial's ``reward``.

Load the dataset and parse the space once on the driver and share them through the object
store with :func:`make_trainable`; without it, each trial loads the dataset and the space
itself.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch
from ray import tune

import search_spaces
from autodropout.patterns import Pattern

from .datasets import DatasetBundle, load_dataset, validation_split
from .training import Budget, build_child, site_selectors, train_child

__all__ = ["claim_device", "make_trainable", "pattern_trainable"]


def make_trainable(bundle: DatasetBundle, space: search_spaces.SearchSpace | None = None):
    """:func:`pattern_trainable` with ``bundle`` (and the parsed ``space``) put in the object
    store once, for every trial: trials then read no dataset file and no space file."""
    return tune.with_parameters(pattern_trainable, data=bundle, space=space)


def pattern_trainable(config: dict[str, Any], data: DatasetBundle | None = None,
                      space: search_spaces.SearchSpace | None = None) -> None:
    """Tune function trainable; see the module docstring for ``config`` and the metrics."""
    started = time.perf_counter()
    pattern = Pattern.from_json(config["pattern"], source="config['pattern']")
    if space is None:
        space = search_spaces.load(config.get("space") or pattern.space)
    budget = Budget.from_mapping(space.budget, **config.get("budget", {}))
    seed = config.get("seed", 0)
    if data is None:
        data = load_dataset(budget.dataset, config.get("data_dir"), config.get("download", True))
    elif data.name != budget.dataset:
        raise ValueError(f"data: the trainable holds {data.name!r} but the budget trains on "
                         f"{budget.dataset!r}")
    device, threads = claim_device()
    model = build_child(budget, data, seed, config.get("model_args", {}))
    sites = site_selectors(pattern, config.get("site_modules", space.site_modules))
    holdout = validation_split(data.train, budget.validation_examples, budget.train_examples,
                               seed=config.get("split_seed", 0))
    constants = {"node": ray.util.get_node_ip_address(), "pid": os.getpid(),
                 "device": str(device), "threads": threads, "pattern_hash": pattern.hash}

    def report(metrics: dict[str, Any]) -> None:
        tune.report({**metrics, **constants, "duration": time.perf_counter() - started})

    train_child(model, pattern, sites, holdout, budget, device, seed, report,
                validate_at=config.get("validate_at", ()))


def claim_device() -> tuple[torch.device, int]:
    """The GPU Ray granted this trial, else the CPU with one torch thread per granted CPU
    (so concurrent trials do not oversubscribe the cores); returns (device, threads)."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda"), torch.get_num_threads()
    granted = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(granted)))
    return torch.device("cpu"), torch.get_num_threads()
