"""train_child on synthetic data: it learns, reports every epoch, is reproducible, and stops
diverging runs with reward 0."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import search_spaces
from autodropout.patterns import PatternDropout, apply_pattern
from workers.datasets import load_dataset, validation_split
from workers.models import GPTLanguageModel, build_model
from workers.training import (
    Budget,
    evaluate_child,
    reward_from_perplexity,
    site_selectors,
    train_child,
)

REQUIRED = {"epoch", "train_loss", "val_accuracy", "reward", "final", "diverged", "reason"}
BUDGET = {"model": "tiny", "dataset": "synthetic", "epochs": 2, "train_examples": 256,
          "validation_examples": 128, "batch_size": 16, "lr": 0.1}


def tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def holdout():
    return validation_split(load_dataset("synthetic").train, 128, 256)


@pytest.fixture(scope="module")
def pattern():
    space = search_spaces.load("tiny")
    return space.decode([1] * len(space.decisions))  # 4x4 boxes, stride 16, filled, rotated


def run(holdout, pattern, seed=0, **overrides):
    reports = []
    model = tiny_convnet()
    last = train_child(model, pattern, None, holdout, {**BUDGET, **overrides}, seed=seed,
                       report=reports.append)
    return model, reports, last


def test_eval_every_validates_only_where_asked_and_trains_the_same(holdout, pattern):
    """Validation is a pure read: skipping it changes no weight, mask or batch order, so the
    last epoch's metrics equal those of a run that validated after every epoch."""
    budget = {**BUDGET, "epochs": 5, "train_examples": 64, "validation_examples": 32}
    reports = []
    every = train_child(tiny_convnet(), pattern, None, holdout, budget, seed=3)
    sparse = train_child(tiny_convnet(), pattern, None, holdout, {**budget, "eval_every": 2},
                         seed=3, report=reports.append, validate_at={1})
    assert [r["epoch"] for r in reports] == [1, 2, 4, 5]
    assert [r["final"] for r in reports] == [False, False, False, True]
    assert {k: v for k, v in sparse.items() if "seconds" not in k} == \
        {k: v for k, v in every.items() if "seconds" not in k}


def test_learns_with_a_pattern_and_reports_each_epoch(holdout, pattern):
    model, reports, last = run(holdout, pattern)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert [r["final"] for r in reports] == [False, True]
    assert all(r.keys() >= REQUIRED and not r["diverged"] for r in reports)
    assert last == reports[-1]
    assert reports[1]["train_loss"] < reports[0]["train_loss"] < math.log(10)
    # above chance (0.1) by 6 standard deviations of a guesser's accuracy on 128 examples
    assert last["val_accuracy"] > 0.1 + 6 * math.sqrt(0.1 * 0.9 / 128)
    assert last["reward"] == last["val_accuracy"]
    assert_pattern_removed(model)


def assert_pattern_removed(model: nn.Module) -> None:
    """No pattern layer, hook or reserved name is left, and the model computes what the same
    weights without a pattern compute, in training mode too (where a left hook would drop)."""
    assert not any(isinstance(module, PatternDropout) for module in model.modules())
    assert not any(name.startswith("autodropout_") for name, _ in model.named_modules())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    plain = tiny_convnet()
    plain.load_state_dict(model.state_dict())
    batch = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        for mode in (False, True):
            model.train(mode), plain.train(mode)
            assert torch.equal(model(batch), plain(batch))


def dropped_fractions(holdout, pattern) -> tuple[list[float], list[tuple[int, ...]]]:
    """Train one epoch, recording at each hooked BatchNorm's ReLU the fraction of exact
    zeros in its input (the BatchNorm output after the pattern's hook) and its shape."""
    model = tiny_convnet()
    relus = [model[2], model[5]]  # after the two BatchNorm2d, the pattern's default sites
    zeros: list[list[float]] = [[], []]
    shapes: list[tuple[int, ...]] = [(), ()]

    def recorder(index):
        def hook(module, args):
            if module.training:
                zeros[index].append((args[0] == 0).float().mean().item())
                shapes[index] = tuple(args[0].shape)
        return hook

    for index, relu in enumerate(relus):
        relu.register_forward_pre_hook(recorder(index))
    train_child(model, pattern, None, holdout, {**BUDGET, "epochs": 1})
    return [sum(z) / len(z) for z in zeros], shapes


def test_the_pattern_changes_training(holdout, pattern):
    _, with_pattern, _ = run(holdout, pattern, epochs=1)
    _, without, _ = run(holdout, None, epochs=1)
    assert with_pattern[0]["train_loss"] != without[0]["train_loss"]
    # ... and the change is the pattern's: the hooked activations lose the fraction the
    # pattern's own masks drop, at each site (and nothing without a pattern)
    observed, shapes = dropped_fractions(holdout, pattern)
    assert max(dropped_fractions(holdout, None)[0]) < 1e-3
    torch.manual_seed(0)
    for index, (fraction, shape) in enumerate(zip(observed, shapes)):
        layer = PatternDropout.from_pattern(pattern, index if len(pattern) > 1 else 0)
        expected = 1 - torch.stack([layer.keep_mask(torch.zeros(shape)).float().mean()
                                    for _ in range(64)]).mean().item()
        assert expected > 0.01
        assert fraction == pytest.approx(expected, rel=0.15), (index, fraction, expected)


def test_same_seed_same_run_other_seed_other_run(holdout, pattern):
    def trace(seed):
        _, reports, _ = run(holdout, pattern, seed=seed, epochs=1)
        return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in reports]

    assert trace(0) == trace(0)
    assert trace(0) != trace(1)


def test_divergence_ends_early_with_reward_zero(holdout, pattern):
    _, reports, last = run(holdout, pattern, lr=1e6)
    assert len(reports) == 1
    assert last["diverged"] and last["final"] and last["reward"] == 0.0
    assert "loss" in last["reason"]


def test_nan_loss_is_divergence(holdout):
    model = tiny_convnet()
    with torch.no_grad():
        model[-1].bias.fill_(math.nan)
    last = train_child(model, None, None, holdout, BUDGET)
    assert (last["epoch"], last["diverged"], last["reward"]) == (1, True, 0.0)
    assert last["reason"] == "train loss is nan"


def test_language_model_reports_perplexity_and_enas_reward(pattern):
    data = load_dataset("synthetic-text")
    space = search_spaces.load("transformer")
    sequence_pattern = space.decode([0] * len(space.decisions))
    model = build_model("gpt", seed=0, vocab_size=data.vocab_size, context=32, d_model=32,
                        n_layers=1, n_heads=2)
    assert isinstance(model, GPTLanguageModel)
    budget = {"model": "gpt", "dataset": "synthetic-text", "epochs": 1, "train_examples": 4096,
              "validation_examples": 1024, "batch_size": 16, "lr": 3e-3, "context": 32}
    reports = []
    last = train_child(model, sequence_pattern, None, validation_split(data.train, 1024, 4096),
                       budget, seed=0, report=reports.append)
    assert len(reports) == 1 and last["final"] and not last["diverged"]
    assert last["val_perplexity"] < data.vocab_size  # better than a uniform guess
    assert last["reward"] == pytest.approx(80 / last["val_perplexity"])


def test_reward_from_perplexity():
    assert reward_from_perplexity(80.0) == 1.0
    assert reward_from_perplexity(160.0) == 0.5
    assert reward_from_perplexity(math.inf) == 0.0
    assert reward_from_perplexity(math.nan) == 0.0


STAGES = ("group1.*.bn*", "group2.*.bn*", "group3.*.bn*")


def test_site_selectors_put_each_site_on_its_stage():
    space = search_spaces.load("convnet")
    pattern = space.decode([0] * len(space.decisions))
    assert space.site_modules == STAGES
    model = build_model("wide_resnet", seed=0, depth=10, width=1)
    handle = apply_pattern(model, pattern, site_selectors(pattern, STAGES))
    names = [f"group{g}.0.bn{i}" for g in (1, 2, 3) for i in (1, 2)]
    assert handle.module_names == names
    assert [dict(handle.dropouts[name].site) for name in names] == [
        dict(pattern.sites[g]) for g in (0, 0, 1, 1, 2, 2)]
    assert site_selectors(pattern, (None, None, None)) is None


@pytest.mark.parametrize("globs, match", [
    (("block1.*", "group2.*.bn*", "group3.*.bn*"), r"sites\[0\]: selector 'block1\.\*' matches no module"),
    (("group*.bn*", "group2.*.bn*", "group3.*.bn*"), r"group2\.0\.bn1 is selected by both site 0 and site 1"),
    (("group1.*.bn*", None, "group3.*.bn*"), "a glob for each of the pattern's 3 sites"),
])
def test_site_selector_errors(globs, match):
    space = search_spaces.load("convnet")
    pattern = space.decode([0] * len(space.decisions))
    model = build_model("wide_resnet", seed=0, depth=10, width=1)
    with pytest.raises(ValueError, match=match):
        apply_pattern(model, pattern, site_selectors(pattern, globs))


def test_budget_from_mapping_checks_keys():
    budget = Budget.from_mapping(BUDGET, epochs=3)
    assert (budget.epochs, budget.weight_decay, budget.context) == (3, 0.0, 64)
    with pytest.raises(ValueError, match="unknown key 'epoch'"):
        Budget.from_mapping(BUDGET, epoch=3)
    with pytest.raises(ValueError, match="lr is missing"):
        Budget.from_mapping({k: v for k, v in BUDGET.items() if k != "lr"})
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Budget.from_mapping(BUDGET, batch_size=0)


def test_the_budget_has_exactly_the_settings_a_space_may_hold():
    from dataclasses import fields

    from search_spaces.settings import BUDGET_SETTINGS
    from workers.training import Budget

    assert {f.name for f in fields(Budget)} == set(BUDGET_SETTINGS)
    with pytest.raises(ValueError, match=r"^budget: augment must be one of \[none, crop-flip\]"):
        Budget.from_mapping({"model": "wrn", "dataset": "x", "epochs": 1, "train_examples": 8,
                             "validation_examples": 8, "batch_size": 4, "lr": 0.1,
                             "augment": "mixup"})


def test_augmented_training_differs_and_recalibration_runs_before_the_last_validation(holdout):
    results = {name: run(holdout, None, **changes)[2] for name, changes in (
        ("plain", {}), ("augmented", {"augment": "crop-flip"}),
        ("recalibrated", {"recalibrate_bn": True}))}
    plain, augmented, recalibrated = results["plain"], results["augmented"], results["recalibrated"]
    assert plain["train_loss"] != augmented["train_loss"]
    assert plain["train_loss"] == recalibrated["train_loss"]  # the same training, then new
    assert plain["val_loss"] != recalibrated["val_loss"]      # BatchNorm statistics


def test_epochs_report_how_their_time_splits_and_evaluate_child_agrees(holdout, pattern):
    model, reports, last = run(holdout, pattern)
    for r in reports:
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0
        assert r["epoch_seconds"] == pytest.approx(r["train_seconds"] + r["eval_seconds"])
    # the model comes back in its own (contiguous) memory format, and validating it again
    # gives what the last epoch reported
    assert all(p.is_contiguous() for p in model.parameters())
    again = evaluate_child(model, holdout, BUDGET)
    assert again["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert again["val_accuracy"] == last["val_accuracy"]


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@pytest.mark.parametrize("budget_changes", [{}, {"augment": "crop-flip"}])
def test_training_steps_never_read_a_tensor_on_the_host(holdout, pattern, monkeypatch,
                                                        budget_changes):
    """A CPU stand-in for CUDA's sync check: an epoch of steps (pattern on) reads no tensor
    value on the host (a read is a device synchronisation on a GPU); the mean loss comes
    back as a tensor, read once by the caller."""
    from workers import training

    budget = Budget.from_mapping({**BUDGET, **budget_changes})
    model = tiny_convnet()
    task = training._task_for(holdout, budget, torch.device("cpu"))
    optimizer = task.optimizer(model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, task.steps_per_epoch)
    handle = apply_pattern(model, pattern)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host during the training steps")

    with task.layout(model), monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, refuse)
        mean_loss = training._train_epoch(model, task, optimizer, scheduler,
                                          torch.Generator().manual_seed(0))
        sums = task.validation_sums(model)
    handle.remove()
    assert isinstance(mean_loss, torch.Tensor) and math.isfinite(float(mean_loss))
    assert sums.shape == (2,)
