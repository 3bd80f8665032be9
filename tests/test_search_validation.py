"""`autodropout search` checks on the driver, before Ray starts, everything a trial would
reject; and how a search ends (failed trials, Ctrl-C, seeds) with the Tuner replaced by a
stand-in, so none of these tests needs Ray."""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import pytest
import yaml

import search_spaces
from autodropout.cli import main
from patterns_db import PatternStore

TINY = yaml.safe_load(search_spaces.loader.resolve("tiny").read_text())


def ray_running() -> bool:
    import ray

    return ray.is_initialized()


@pytest.fixture
def search(tmp_path, monkeypatch):
    """``autodropout search`` arguments for the tiny space in ``tmp_path``; ``search.run``
    runs them and asserts the one-line exit-2 error, nothing written and no Ray started."""
    monkeypatch.delenv("AUTODROPOUT_DATA_DIR", raising=False)
    db = tmp_path / "patterns.db"
    experiments = tmp_path / "experiments"

    def args(*extra: str) -> list[str]:
        return ["search", "--space", "tiny", "--db", f"sqlite:///{db}",
                "--experiments-dir", str(experiments), "--quiet", *extra]

    def refused(capsys, *extra: str) -> str:
        ray_before = ray_running()
        assert main(args(*extra)) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith("autodropout: error: ")
        assert not experiments.exists()
        assert ray_running() == ray_before
        if db.exists():
            with PatternStore(f"sqlite:///{db}") as store:
                assert store.searches() == []
        return captured.err

    args.refused = refused
    args.db = f"sqlite:///{db}"
    args.experiments = experiments
    return args


def write_space(folder: Path, name: str = "space.yaml", **budget) -> Path:
    content = {**TINY, "budget": {**TINY["budget"], **budget}}
    path = folder / name
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# -- 2. values only the trials used to check --------------------------------------------------
def test_unknown_budget_model_names_the_space_file_and_line(search, capsys, tmp_path):
    space = write_space(tmp_path, model="resnet50")
    err = search.refused(capsys, "--space", str(space))
    assert f"{space}:{line_of(space, 'model:')}: budget.model must be one of [wrn, gpt], " \
           "got 'resnet50'" in err


def test_unknown_budget_model_is_caught_by_check_space(tmp_path):
    """What ``autodropout spaces show`` can call: no torch, no data."""
    from autodropout.errors import BadInput
    from controller.preflight import check_space

    space = search_spaces.load(write_space(tmp_path, model="resnet50"))
    with pytest.raises(BadInput, match=r"space\.yaml:\d+: budget\.model must be one of"):
        check_space(space)
    assert check_space(search_spaces.load("tiny")) == ("synthetic", "wrn")


def test_train_examples_beyond_the_dataset(search, capsys, tmp_path):
    space = write_space(tmp_path, train_examples=5000)
    err = search.refused(capsys, "--space", str(space))
    assert f"{space}:{line_of(space, 'train_examples')}: budget.train_examples: 5000 is more " \
           "than the 1920 examples left in synthetic's training split (2048)" in err


def test_validation_examples_beyond_the_dataset(search, capsys, tmp_path):
    space = write_space(tmp_path, validation_examples=4096)
    err = search.refused(capsys, "--space", str(space))
    assert "budget.validation_examples: 4096 is more than" in err


def test_module_glob_matching_nothing(search, capsys, tmp_path):
    content = {**TINY, "sites": [{"name": "stage9", "modules": "group9.*.bn*"}]}
    space = tmp_path / "globs.yaml"
    space.write_text(yaml.safe_dump(content, sort_keys=False))
    err = search.refused(capsys, "--space", str(space))
    assert f"{space}:{line_of(space, 'modules:')}: sites[0].modules: 'group9.*.bn*' matches " \
           "no module of the wrn child model" in err


def test_image_model_with_a_text_dataset(search, capsys):
    err = search.refused(capsys, "--dataset", "synthetic-text")
    assert "budget.model: the wrn model trains on image data; synthetic-text is a text " \
           "dataset" in err


def test_model_taking_other_patterns_than_the_space(search, capsys):
    err = search.refused(capsys, "--model", "gpt", "--dataset", "synthetic-text")
    assert "--model: the gpt model takes sequence patterns; space 'tiny'" in err


def test_valid_spaces_pass_the_driver_checks():
    """The shipped spaces on data of their kind: the probes apply and remove cleanly."""
    from controller.preflight import check_trial_setup, make_budget
    from controller.service import SearchOptions
    from workers.datasets import load_dataset

    for name, dataset in (("tiny", "synthetic"), ("convnet", "synthetic"),
                          ("transformer", "synthetic-text")):
        space = search_spaces.load(name)
        options = SearchOptions(space=name)
        budget = make_budget(options, space, dataset, space.budget["model"])
        budget.update(train_examples=1024, validation_examples=512)
        check_trial_setup(space, budget, load_dataset(dataset), 0, options)


# -- 6c. --train-examples ---------------------------------------------------------------------
def test_train_examples_flag_is_checked_against_the_dataset(search, capsys):
    err = search.refused(capsys, "--train-examples", "1921")
    assert "--train-examples: 1921 is more than the 1920 examples" in err
    err = search.refused(capsys, "--train-examples", "0")
    assert "--train-examples must be a positive integer, got 0" in err


# -- 4. data folders --------------------------------------------------------------------------
def test_data_dir_without_the_dataset(search, capsys, tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    err = search.refused(capsys, "--dataset", "fashion-mnist", "--data-dir", str(empty))
    assert f"{empty / 'fashion-mnist'} does not exist" in err
    assert "train-images-idx3-ubyte.gz" in err and "download" in err


def test_data_dir_from_the_environment(search, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODROPOUT_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    err = search.refused(capsys, "--dataset", "ptb")
    assert "(from AUTODROPOUT_DATA_DIR)" in err and "ptb.train.txt" in err
    assert not (tmp_path / "cache").exists()


def test_truncated_dataset_file_names_it(search, capsys, tmp_path, shared_data_dir):
    folder = tmp_path / "data" / "fashion-mnist"
    shutil.copytree(Path(shared_data_dir, "fashion-mnist"), folder)
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:1000])
    err = search.refused(capsys, "--dataset", "fashion-mnist", "--data-dir",
                         str(tmp_path / "data"))
    assert f"--dataset fashion-mnist: {labels}: not a readable gzip file" in err


def test_corrupt_text_file_names_it(search, capsys, tmp_path):
    folder = tmp_path / "data" / "ptb"
    folder.mkdir(parents=True)
    (folder / "ptb.train.txt").write_bytes(b"a b c\n\xff\xfe broken\n")
    (folder / "ptb.test.txt").write_text("a b\n")
    space = write_space(tmp_path)  # the wrn on ptb is refused later; the file comes first
    err = search.refused(capsys, "--space", str(space), "--dataset", "ptb", "--data-dir",
                         str(tmp_path / "data"))
    assert f"{folder / 'ptb.train.txt'}: not UTF-8 text" in err


def test_wrong_idx_content(search, capsys, tmp_path):
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(gzip.compress(b"\0" * 64))
    err = search.refused(capsys, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"))
    assert "train-images-idx3-ubyte.gz: IDX magic number is 0, expected 2051" in err


# -- 5. --warm-start --------------------------------------------------------------------------
def test_unknown_warm_start(search, capsys):
    err = search.refused(capsys, "--warm-start", "never-ran")
    assert "--warm-start: no search named 'never-ran'" in err


def test_warm_start_with_the_random_controller(search, capsys):
    err = search.refused(capsys, "--controller", "random", "--warm-start", "x")
    assert "--warm-start: the random controller has no policy" in err


# -- the rest, with a stand-in Tuner ----------------------------------------------------------
class FakeTuner:
    """Records ``outcomes`` (one trial each: "completed" or an error text) as the store
    callback would, or raises ``interrupt``."""

    def __init__(self, callbacks, searcher, param_space, outcomes=(), interrupt=None):
        self.callbacks, self.searcher, self.param_space = callbacks, searcher, param_space
        self.outcomes, self.interrupt = outcomes, interrupt

    def fit(self):
        store = self.callbacks[0].store
        for index, outcome in enumerate(self.outcomes):
            config = self.searcher.suggest(f"t{index}")
            failed = outcome != "completed"
            store.record_trial(self.callbacks[0].search, f"t{index}", yaml.safe_load(
                config["pattern"]), reward=None if failed else 0.5,
                status="failed" if failed else "completed", error=outcome if failed else None)
        if self.interrupt:
            raise self.interrupt


@pytest.fixture
def fake_tune(monkeypatch):
    """Replace Ray and the Tuner; returns the list of tuners built."""
    import controller.service as service

    class Built(list):
        behaviour: dict

    built = Built()
    behaviour: dict = {}

    def build_tuner(options, space, budget, name, data, searcher, callbacks, seed):
        (options.experiments_dir and Path(options.experiments_dir, name).mkdir(
            parents=True, exist_ok=True))
        built.append(FakeTuner(callbacks, searcher, {"seed": seed, "budget": budget},
                               **behaviour))
        return built[-1]

    monkeypatch.setattr(service, "start_ray", lambda address: None)
    monkeypatch.setattr(service, "build_tuner", build_tuner)
    built.behaviour = behaviour
    return built


def test_search_whose_trials_all_failed_is_failed(search, fake_tune, capsys):
    fake_tune.behaviour["outcomes"] = ["SpaceError: boom", "SpaceError: again"]
    assert main(search("--trials", "2", "--name", "broken")) == 1
    captured = capsys.readouterr()
    assert "search broken: failed, 2 trials (0 completed, 2 failed)" in captured.out
    assert "autodropout: error: search broken failed: 2 of 2 trials failed; first error: " \
           "SpaceError: boom" in captured.err
    with PatternStore(search.db) as store:
        assert store.get_search("broken").status == "failed"


def test_search_with_a_minority_of_failed_trials_completes(search, fake_tune, capsys):
    fake_tune.behaviour["outcomes"] = ["completed", "completed", "lost node"]
    assert main(search("--trials", "3", "--name", "mostly")) == 0
    captured = capsys.readouterr()
    assert "search mostly: completed, 3 trials (2 completed, 1 failed)" in captured.out
    assert "1 of 3 trials failed; first error: lost node" in captured.err
    with PatternStore(search.db) as store:
        assert store.get_search("mostly").status == "completed"


def test_final_state_rule():
    from controller.service import final_state
    from patterns_db.states import SearchState

    assert final_state({"completed": 2, "failed": 2}, 4) is SearchState.COMPLETED
    assert final_state({"completed": 1, "failed": 2}, 3) is SearchState.FAILED
    assert final_state({"failed": 1, "running": 1}, 2) is SearchState.STOPPED


def test_ctrl_c_prints_the_cli_resume_command_and_exits_130(search, fake_tune, capsys):
    fake_tune.behaviour["interrupt"] = KeyboardInterrupt()
    assert main(search("--trials", "2")) == 130
    err = capsys.readouterr().err
    with PatternStore(search.db) as store:
        [summary] = store.searches()
    name = summary.search.name
    assert summary.search.status == "stopped"
    assert f"continue it with: autodropout search --resume {name} --db {search.db} " \
           f"--experiments-dir {search.experiments}" in err
    assert "Tuner.restore" not in err


def test_tune_stopping_on_sigint_is_a_stopped_search_exit_130(search, fake_tune, capsys):
    """Tune's own SIGINT handler ends fit() normally with trials still to run."""
    fake_tune.behaviour["outcomes"] = ["completed"]
    assert main(search("--trials", "3", "--name", "halted")) == 130
    captured = capsys.readouterr()
    assert "search halted: stopped" in captured.out
    assert "continue it with: autodropout search --resume halted" in captured.err


def test_tunes_restore_hint_is_dropped():
    from controller.service import quiet_restore_hint

    quiet_restore_hint()
    logger = logging.getLogger("ray.tune.tune")
    record = logger.makeRecord("ray.tune.tune", logging.WARNING, __file__, 1,
                               "Resume experiment with: Tuner.restore(path=%r)", ("x",), None)
    assert not logger.filter(record)


def test_seed_is_drawn_stored_and_kept_on_resume(search, fake_tune, capsys):
    fake_tune.behaviour["outcomes"] = ["completed"]
    assert main(search("--trials", "1", "--name", "one")) == 0
    assert main(search("--trials", "1", "--name", "two")) == 0
    with PatternStore(search.db) as store:
        seeds = [store.get_search(name).controller_settings["seed"] for name in ("one", "two")]
    assert seeds[0] != seeds[1]
    assert [tuner.param_space["seed"] for tuner in fake_tune] == seeds
    first_patterns = [tuner.searcher.controller.seed for tuner in fake_tune]
    assert first_patterns == seeds
    assert f"seed {seeds[0]}" in capsys.readouterr().out
    assert main(["search", "--resume", "one", "--db", search.db, "--experiments-dir",
                 str(search.experiments), "--quiet"]) == 0
    assert fake_tune[-1].param_space["seed"] == seeds[0]
    assert main(["searches", "show", "one", "--db", search.db]) == 0
    assert f'"seed": {seeds[0]}' in capsys.readouterr().out
    assert main(search("--resume", "one", "--seed", str(seeds[0] + 1))) == 2
    err = capsys.readouterr().err
    assert f"--seed: search 'one' was started with seed {seeds[0]}" in err


def test_explicit_seed_is_used(search, fake_tune):
    fake_tune.behaviour["outcomes"] = ["completed"]
    assert main(search("--trials", "1", "--name", "fixed", "--seed", "7")) == 0
    assert fake_tune[-1].param_space["seed"] == 7


# -- 6a. progress -----------------------------------------------------------------------------
class FakeTrial:
    def __init__(self, trial_id, status="RUNNING", last_result=None):
        self.trial_id, self.status, self.last_result = trial_id, status, last_result or {}


def test_progress_counts_running_completed_and_failed_with_an_eta(monkeypatch):
    from controller.callbacks import ProgressCallback

    clock = {"now": 100.0}
    progress = ProgressCallback(4, clock=lambda: clock["now"])
    monkeypatch.setattr(ProgressCallback, "_show", lambda self: None)  # state, not rendering
    progress.setup()
    a, b = FakeTrial("a"), FakeTrial("b")
    progress.on_trial_start(0, [a, b], a)
    progress.on_trial_start(0, [a, b], b)
    assert progress.eta() is None and "running 2 [starting; starting]" in progress.describe()
    clock["now"] = 110.0
    progress.on_trial_result(1, [a, b], a, {"epoch": 1, "epochs": 2, "reward": 0.4})
    progress.on_trial_result(1, [a, b], b, {"epoch": 1, "epochs": 2, "reward": 0.3})
    # one trial's worth of work in 10 s, three to go: 30 s
    assert progress.eta() == pytest.approx(30.0)
    assert "running 2 [e1/2 reward 0.400; e1/2 reward 0.300]" in progress.describe()
    clock["now"] = 120.0
    a.last_result = {"epoch": 2, "epochs": 2, "reward": 0.6, "final": True}
    progress.on_trial_complete(2, [a, b], a)
    progress.on_trial_error(2, [a, b], b)
    assert (len(progress.completed), len(progress.failed), progress.best) == (1, 1, 0.6)
    assert progress.eta() == pytest.approx(20.0)
    assert "running 0, 1 completed, 1 failed, best 0.6000, ETA 00:20" in progress.describe()


def test_progress_of_a_resumed_search_starts_where_it_was(monkeypatch):
    from controller.callbacks import ProgressCallback

    clock = {"now": 0.0}
    progress = ProgressCallback(3, clock=lambda: clock["now"])
    monkeypatch.setattr(ProgressCallback, "_show", lambda self: None)
    done = FakeTrial("a", "TERMINATED", {"reward": 0.7, "final": True})
    lost = FakeTrial("b", "ERROR")
    new = FakeTrial("c")
    progress.on_trial_start(0, [done, lost, new], new)
    assert (len(progress.completed), len(progress.failed), progress.best) == (1, 1, 0.7)
    clock["now"] = 5.0
    progress.on_trial_result(1, [done, lost, new], new, {"epoch": 1, "epochs": 2})
    assert progress.eta() == pytest.approx(5.0)  # not "two trials in no time"


def test_progress_bar_goes_to_stderr_from_the_start(capsys):
    from controller.callbacks import ProgressCallback

    progress = ProgressCallback(2)
    progress.setup()
    progress.on_experiment_end([])
    captured = capsys.readouterr()
    assert captured.out == "" and "search: 0/2" in captured.err
