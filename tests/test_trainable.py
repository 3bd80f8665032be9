"""The Tune trainable through a real local Ray: per-epoch reports, the final reward, one CPU
thread per granted CPU, and a dataset shared through the object store."""

from __future__ import annotations

import shutil

import pytest
from test_datasets import write_idx_dataset

import search_spaces
from workers.datasets import load_dataset, synthetic_images
from workers.training import Budget, build_child

SMALL = {"train_examples": 128, "validation_examples": 64, "batch_size": 64}


def tiny_patterns() -> list[str]:
    space = search_spaces.load("tiny")
    return [space.decode([i] * len(space.decisions)).to_json() for i in (0, 1)]


def fit(trainable, param_space: dict, storage) -> list:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"pattern": tune.grid_search(tiny_patterns()), "space": "tiny",
                     "model_args": {"width": 1}, **param_space},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(storage), name="trials", verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    return list(results)


@pytest.mark.ray
@pytest.mark.slow
def test_two_trials_on_synthetic_report_each_epoch(ray_session, tmp_path):
    from workers.trainable import pattern_trainable

    results = fit(pattern_trainable, {"budget": {"epochs": 2, **SMALL}}, tmp_path)
    assert len(results) == 2
    hashes = set()
    for result in results:
        history = result.metrics_dataframe
        assert history["epoch"].tolist() == [1, 2]
        assert history["final"].tolist() == [False, True]
        final = result.metrics
        assert 0.0 <= final["reward"] <= 1.0 and final["reward"] == final["val_accuracy"]
        assert not final["diverged"]
        assert final["threads"] == 1 and final["device"] == "cpu"
        assert final["node"] and final["duration"] > 0
        hashes.add(final["pattern_hash"])
    assert len(hashes) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_trials_use_the_shared_bundle_not_the_files(ray_session, tmp_path):
    from workers.trainable import make_trainable

    data_dir = tmp_path / "data"
    write_idx_dataset(data_dir / "fashion-mnist", synthetic_images(256), synthetic_images(16, 7))
    bundle = load_dataset("fashion-mnist", data_dir, download=False)
    shutil.rmtree(data_dir)
    with pytest.raises(FileNotFoundError):  # so a trial that read files would fail
        load_dataset("fashion-mnist", data_dir, download=False)
    budget = {"dataset": "fashion-mnist", "epochs": 1, **SMALL}
    results = fit(make_trainable(bundle),
                  {"budget": budget, "data_dir": str(data_dir), "download": False}, tmp_path)
    assert len(results) == 2
    assert all(r.metrics["final"] and r.metrics["epoch"] == 1 for r in results)


@pytest.mark.ray
@pytest.mark.slow
def test_trials_use_the_parsed_space_not_its_file(ray_session, tmp_path):
    """A search hands its trials the space it parsed: a relative or deleted path in the
    config is never looked up again (Tune runs each trial in its own working directory)."""
    from workers.trainable import make_trainable

    path = tmp_path / "mine.yaml"
    path.write_text(search_spaces.loader.resolve("tiny").read_text().replace("name: tiny",
                                                                              "name: mine"))
    space = search_spaces.load(path)
    path.unlink()
    results = fit(make_trainable(load_dataset("synthetic"), space),
                  {"budget": {"epochs": 1, **SMALL}, "space": "mine.yaml"}, tmp_path)
    assert len(results) == 2 and all(r.metrics["final"] for r in results)


def test_build_child_shapes_the_model_from_the_dataset():
    budget = Budget.from_mapping(search_spaces.load("tiny").budget)
    model = build_child(budget, load_dataset("synthetic"), seed=0, model_args={"width": 1})
    assert (model.fc.out_features, model.conv.in_channels) == (10, 1)
    with pytest.raises(ValueError, match="model 'wrn' needs a image dataset"):
        build_child(budget, load_dataset("synthetic-text"), seed=0, model_args={})
    assert build_child(Budget.from_mapping(budget.__dict__, width=3), load_dataset("synthetic"),
                       seed=0).width == 3
    with pytest.raises(ValueError, match="budget: width is the widening factor of a wrn child"):
        build_child(Budget.from_mapping(search_spaces.load("transformer").budget, width=2,
                                        dataset="synthetic-text"),
                    load_dataset("synthetic-text"), seed=0)
    with pytest.raises(ValueError, match=r"budget: model must be one of \[wrn, gpt\], got 'vgg'"):
        build_child(Budget.from_mapping(budget.__dict__, model="vgg"), load_dataset("synthetic"),
                    seed=0, model_args={})
