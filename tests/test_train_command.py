"""``autodropout train`` in-process: trains on the synthetic dataset, prints mean and std over
seeds, stores one final evaluation per seed linked to the pattern or baseline, and maps bad
references to exit codes 2 (malformed) and 1 (not found)."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest
import torch

import autodropout as ad
import search_spaces
from autodropout.cli import build_parser, main
from patterns_db import PatternStore
from workers.baselines import BASELINE_FORMS
from workers.datasets import load_dataset

QUICK = ["--dataset", "synthetic", "--model", "wrn", "--epochs", "1", "--train-examples", "256",
         "--quiet"]


@pytest.fixture
def db(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def pattern():
    space = search_spaces.load("convnet")
    return space.decode([0] * len(space.decisions))  # 1x1 boxes at stride 4: a sparse grid


def printed_values(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"^\d+\s+(\d\.\d{4})\s", out, flags=re.MULTILINE)]


def test_a_baseline_trains_for_each_seed_and_is_stored(db, capsys):
    assert main(["train", *QUICK, "--regularizer", "dropout:0.3", "--seeds", "2", "--db", db]) == 0
    out = capsys.readouterr().out
    with PatternStore(db) as store:
        evaluations = store.final_evaluations(dataset="synthetic", model="wrn")
    assert [(e.baseline, e.pattern_hash, e.seed, e.metric) for e in evaluations] == [
        ("dropout:0.3", None, 0, "test_accuracy"), ("dropout:0.3", None, 1, "test_accuracy")]
    values = [e.value for e in evaluations]
    assert printed_values(out) == pytest.approx(values, abs=5e-5)
    mean, std = statistics.fmean(values), statistics.stdev(values)
    assert f"test_accuracy: mean {mean:.4f}, std {std:.4f} over 2 seeds" in out
    assert "256 training examples, 512 test" in out
    assert "stored 2 final evaluations of dropout:0.3" in out


def test_a_tagged_pattern_is_trained_and_its_results_linked_to_it(db, pattern, capsys):
    with PatternStore(db) as store:
        store.tag(store.add_pattern(pattern).id, "found-best")
        space = search_spaces.load("convnet")
        store.add_pattern(space.decode([1] * len(space.decisions)))  # a bystander
    assert main(["train", *QUICK, "--regularizer", "found-best", "--seeds", "1", "--db", db]) == 0
    with PatternStore(db) as store:
        linked = store.final_evaluations("found-best")
        assert store.final_evaluations(baselines_only=True) == []
    assert [(e.pattern_hash, e.seed, e.metric) for e in linked] == [
        (pattern.hash, 0, "test_accuracy")]
    assert f"with pattern {pattern.hash[:12]}" in capsys.readouterr().out


def test_a_pattern_file_is_stored_with_its_results(db, pattern, tmp_path, monkeypatch):
    trained = []
    fake_training(monkeypatch, trained)
    path = tmp_path / "found.json"
    path.write_text(json.dumps(pattern.to_dict()))
    assert main(["train", *QUICK, "--regularizer", str(path), "--seeds", "2", "--db", db]) == 0
    with PatternStore(db) as store:
        assert [e.seed for e in store.final_evaluations(pattern.hash[:12])] == [0, 1]
    # the space's per-stage globs put each site on its stage's BatchNorms
    first = trained[0]
    handle = ad.apply_pattern(first["model"], first["pattern"], first["sites"])
    assert len(handle.module_names) == 6
    assert all(name.startswith("group") for name in handle.module_names)


def fake_training(monkeypatch, calls: list) -> None:
    """Record what train_child trains on and evaluate_child scores, without training."""
    def train_child(model, pattern, sites, data, budget, device, seed, report):
        calls.append({"train": data.train, "monitor": data.validation, "sites": sites,
                      "budget": budget, "seed": seed, "model": model, "pattern": pattern})
        return {"val_accuracy": 0.9, "val_loss": 0.1, "epoch": budget.epochs, "diverged": False}

    def evaluate_child(model, data, budget, device):
        calls[-1]["scored"] = data.validation
        return {"val_accuracy": 0.5, "val_loss": 1.0, "val_perplexity": 2.0}

    monkeypatch.setattr("workers.final.train_child", train_child)
    monkeypatch.setattr("workers.final.evaluate_child", evaluate_child)


def test_the_default_is_the_full_training_split_and_test_split(db, monkeypatch, capsys):
    calls = []
    fake_training(monkeypatch, calls)
    args = ["train", "--dataset", "synthetic", "--model", "wrn", "--regularizer", "none",
            "--seeds", "3", "--db", db, "--quiet"]
    assert main(args) == 0
    test = load_dataset("synthetic").test
    assert [call["seed"] for call in calls] == [0, 1, 2]
    for call in calls:
        assert len(call["train"]) == 2048
        assert torch.equal(call["scored"].labels, test.labels)  # scored on the test split
        monitored = {image.tobytes() for image in call["monitor"].images.numpy()}
        assert len(call["monitor"]) == 1024  # progress watches training examples only
        assert monitored <= {image.tobytes() for image in call["train"].images.numpy()}
    assert calls[0]["budget"].epochs == search_spaces.load("convnet").budget["epochs"]
    out = capsys.readouterr().out
    assert "2048 training examples, 512 test" in out
    assert "test_accuracy: mean 0.5000, std 0.0000 over 3 seeds" in out


@pytest.mark.parametrize("ref", ["dropconnect:0.2", "foo:bar"])
def test_an_unknown_baseline_name_exits_2_naming_the_valid_forms(db, ref, capsys):
    assert main(["train", *QUICK, "--regularizer", ref, "--db", db]) == 2
    error = capsys.readouterr().err
    assert f"regularizer {ref!r}: unknown name" in error and "dropblock:P[:SIZE]" in error


@pytest.mark.parametrize("ref", ["dropout:abc", "dropout", "dropblock:0.1:x", "none:0.2"])
def test_malformed_baselines_exit_2(db, ref, capsys):
    assert main(["train", *QUICK, "--regularizer", ref, "--db", db]) == 2
    assert f"regularizer {ref!r}" in capsys.readouterr().err


def test_an_unknown_pattern_tag_exits_1(db, capsys):
    assert main(["train", *QUICK, "--regularizer", "no-such-tag", "--db", db]) == 1
    error = capsys.readouterr().err
    assert "no pattern with tag, id or hash prefix 'no-such-tag'" in error
    assert "a baseline is one of none, dropout:P" in error


def test_pattern_files_missing_exit_1_and_malformed_exit_2(db, tmp_path, capsys):
    assert main(["train", *QUICK, "--regularizer", str(tmp_path / "gone.json"), "--db", db]) == 1
    assert "no such pattern file" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"kind": "conv", "sites": [{"size_h": -1}]}')
    assert main(["train", *QUICK, "--regularizer", str(broken), "--db", db]) == 2


def test_model_mismatches_exit_2(db, pattern, tmp_path, capsys):
    text = ["--dataset", "synthetic-text", "--model", "gpt", "--epochs", "1", "--db", db]
    assert main(["train", *text, "--regularizer", "spatial:0.1"]) == 2
    assert "the gpt model takes none, dropout:P or gaussian:P" in capsys.readouterr().err
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(pattern.to_dict()))
    assert main(["train", *text, "--regularizer", str(path)]) == 2
    assert "is a conv pattern; the gpt model takes sequence patterns" in capsys.readouterr().err
    assert main(["train", *QUICK[:2], "--model", "gpt", "--regularizer", "none", "--db", db]) == 2
    assert "needs a text dataset" in capsys.readouterr().err


def test_a_dropblock_larger_than_a_feature_map_exits_2(db, capsys):
    assert main(["train", *QUICK, "--regularizer", "dropblock:0.1:8", "--db", db]) == 2
    assert "regularizer dropblock:0.1:8: DropBlock2d: block_size=8" in capsys.readouterr().err


def test_bad_counts_exit_2(db, capsys):
    assert main(["train", *QUICK, "--regularizer", "none", "--seeds", "0", "--db", db]) == 2
    assert "--seeds must be a positive integer, got 0" in capsys.readouterr().err


def test_help_lists_every_baseline_form():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = " ".join(train.format_help().split())  # argparse wraps the help
    assert ", ".join(BASELINE_FORMS) in help_text


def test_the_language_model_reports_test_perplexity(db, capsys):
    args = ["train", "--dataset", "synthetic-text", "--model", "gpt", "--regularizer",
            "gaussian:0.1", "--epochs", "1", "--seeds", "1", "--train-examples", "2048",
            "--db", db, "--quiet"]
    assert main(args) == 0
    with PatternStore(db) as store:
        (evaluation,) = store.final_evaluations(dataset="synthetic-text", model="gpt")
    assert (evaluation.baseline, evaluation.metric) == ("gaussian:0.1", "test_perplexity")
    # the chain's best model has perplexity 2, a uniform guess over its 16 tokens 16
    assert 2.0 < evaluation.value < 2 * 16.0
    out = capsys.readouterr().out
    (row,) = re.findall(r"^0\s+(\S+)\s+(\S+)\s", out, flags=re.MULTILINE)
    assert float(row[0]) == pytest.approx(math.exp(float(row[1])), rel=1e-3)
    assert f"test_perplexity: mean {evaluation.value:.4f}" in out


def test_evaluate_child_scores_as_train_child_validates():
    from workers.datasets import validation_split
    from workers.models import WideResNet
    from workers.training import evaluate_child, train_child

    holdout = validation_split(load_dataset("synthetic").train, 64, 64)
    budget = {"model": "wrn", "dataset": "synthetic", "epochs": 1, "train_examples": 64,
              "validation_examples": 64, "batch_size": 32, "lr": 0.05}
    model = WideResNet()
    last = train_child(model, None, None, holdout, budget)
    scored = evaluate_child(model.train(), holdout, budget)
    assert scored == {"val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"]}
    assert model.training


def test_the_cli_modules_load_no_torch_and_training_loads_no_ray():
    import subprocess
    import sys

    cli = ("import sys, autodropout.cli.train, autodropout.cli.search; from autodropout.cli import "
           "build_parser; build_parser(); print(sorted(m for m in sys.modules "
           "if m.split('.')[0] in ('torch', 'ray')))")
    train = ("import sys, workers.service, workers.final; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    for code in (cli, train):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == "[]", code


CUSTOM_SPACE = """\
name: my-blocks
kind: conv
description: One site on the first stage only, with a budget of its own.
sites:
  - {name: first, modules: "group1.*.bn*"}
decisions:
  size_h: [2, 3]
  size_w: [2, 3]
  stride: [8]
  repeat: [fill]
  rotate: [0]
  shear_x: [0.0]
  shear_y: [0.0]
  share_c: [true]
  residual: [false]
budget:
  model: wrn
  dataset: synthetic
  epochs: 2
  train_examples: 192
  validation_examples: 64
  batch_size: 32
  lr: 0.02
"""


def store_found_pattern(db, space_text, tag="found", search="custom-search", reward=0.8):
    """A pattern of the space ``space_text`` found by search ``search``, tagged ``tag``."""
    space = search_spaces.parse(space_text)
    pattern = space.decode([1] * len(space.decisions))
    with PatternStore(db) as store:
        store.create_search(search, space.name, space_text, "synthetic", "wrn")
        store.record_trial(search, "t1", pattern, reward=reward, status="completed")
        store.finish_search(search)
        store.tag(pattern.hash, tag)
    return pattern


def test_a_pattern_of_a_custom_space_trains_with_its_search_space(db, monkeypatch, capsys):
    calls = []
    fake_training(monkeypatch, calls)
    pattern = store_found_pattern(db, CUSTOM_SPACE)
    # no --space, no --model, no --epochs: all of it comes from the search's stored space
    assert main(["train", "--dataset", "synthetic", "--regularizer", "found", "--db", db,
                 "--seeds", "1", "--quiet"]) == 0
    (call,) = calls
    budget = call["budget"]
    assert (budget.model, budget.epochs, budget.batch_size, budget.lr) == ("wrn", 2, 32, 0.02)
    assert call["pattern"].hash == pattern.hash
    handle = ad.apply_pattern(call["model"], call["pattern"], call["sites"])
    assert handle.module_names and all(name.startswith("group1.") for name in handle.module_names)
    captured = capsys.readouterr()
    assert "not shipped" not in captured.err and "convnet" not in captured.err
    assert "budget of space 'my-blocks' of search 'custom-search'" in captured.out
    with PatternStore(db) as store:
        (evaluation,) = store.final_evaluations("found")
    assert (evaluation.model, evaluation.dataset) == ("wrn", "synthetic")


def test_the_best_trials_search_gives_the_space(db, monkeypatch):
    calls = []
    fake_training(monkeypatch, calls)
    pattern = store_found_pattern(db, CUSTOM_SPACE, reward=0.9)
    tiny_budget = CUSTOM_SPACE.replace("epochs: 2", "epochs: 3").replace("my-blocks", "my-other")
    with PatternStore(db) as store:  # a worse trial of the same pattern in another space
        store.create_search("other", "my-other", tiny_budget, "synthetic", "wrn")
        store.record_trial("other", "t1", pattern, reward=0.1, status="completed")
    assert main(["train", "--dataset", "synthetic", "--regularizer", "found", "--db", db,
                 "--seeds", "1", "--quiet"]) == 0
    assert calls[0]["budget"].epochs == 2


def test_a_pattern_no_search_tried_falls_back_naming_the_space(db, tmp_path, monkeypatch,
                                                                capsys):
    calls = []
    fake_training(monkeypatch, calls)
    pattern = search_spaces.parse(CUSTOM_SPACE).decode([0, 0])
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(pattern.to_dict()))
    assert main(["train", "--dataset", "synthetic", "--regularizer", str(path), "--db", db,
                 "--seeds", "1", "--quiet"]) == 0
    assert calls[0]["budget"].epochs == search_spaces.load("convnet").budget["epochs"]
    error = capsys.readouterr().err
    assert "its space 'my-blocks' is not shipped" in error
    assert "using the budget and sites of space 'convnet'" in error


def test_the_model_defaults_to_the_spaces_budget_model(db, monkeypatch, tmp_path, capsys):
    calls = []
    fake_training(monkeypatch, calls)
    store_found_pattern(db, CUSTOM_SPACE.replace("model: wrn", "model: wide_resnet"))
    assert main(["train", "--dataset", "synthetic", "--regularizer", "found", "--db", db,
                 "--seeds", "1", "--quiet"]) == 0
    assert calls[0]["budget"].model == "wrn" and "training wrn on synthetic" in \
        capsys.readouterr().out
    # a baseline with --space takes that space's model; a text dataset does not fit it
    assert main(["train", "--dataset", "synthetic-text", "--regularizer", "none", "--space",
                 "tiny", "--db", db, "--quiet"]) == 2
    assert "the model wrn (the space's budget.model; pass --model) needs an image dataset; " \
        "synthetic-text is text" in capsys.readouterr().err
    assert main(["train", "--dataset", "synthetic-text", "--regularizer", "none", "--space",
                 "transformer", "--db", db, "--seeds", "1", "--quiet"]) == 0
    assert calls[-1]["budget"].model == "gpt"


@pytest.mark.parametrize(("dataset", "model", "metric"), [
    ("synthetic", "wrn", "test_accuracy"), ("synthetic-text", "gpt", "test_perplexity")])
def test_the_model_defaults_to_the_datasets_kind(db, monkeypatch, capsys, dataset, model,
                                                  metric):
    calls = []
    fake_training(monkeypatch, calls)
    assert main(["train", "--dataset", dataset, "--regularizer", "dropout:0.1", "--db", db,
                 "--seeds", "1", "--quiet"]) == 0
    assert calls[0]["budget"].model == model
    assert f"budget of space '{'convnet' if model == 'wrn' else 'transformer'}'" in \
        capsys.readouterr().out
    with PatternStore(db) as store:
        (evaluation,) = store.final_evaluations(dataset=dataset, model=model)
    assert evaluation.metric == metric
