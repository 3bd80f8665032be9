"""`autodropout search` end to end on a real local Ray (the session fixture), and its bad input."""

import subprocess
import sys

import pytest
import yaml

import search_spaces
from autodropout.cli import main
from patterns_db import PatternStore
from workers.training import ENAS_PERPLEXITY_SCALE


@pytest.fixture
def search_args(tmp_path):
    db = f"sqlite:///{tmp_path / 'patterns.db'}"

    def args(*extra):
        return ["search", "--space", "tiny", "--dataset", "synthetic", "--db", db,
                "--experiments-dir", str(tmp_path / "experiments"), "--quiet", *extra]

    args.db = db
    return args


@pytest.mark.ray
@pytest.mark.slow
def test_search_end_to_end(ray_session, search_args, capsys):
    assert main(search_args("--trials", "6", "--concurrent", "2", "--name", "e2e")) == 0
    out = capsys.readouterr().out
    assert "search e2e: completed, 6 trials" in out and "best pattern tagged e2e-best" in out
    with PatternStore(search_args.db) as store:
        trials = store.trials("e2e")
        assert len(trials) == 6 and {t.status for t in trials} == {"completed"}
        assert len({t.trial_id for t in trials}) == 6
        assert all(t.metrics and t.metrics[-1]["reward"] == t.reward for t in trials)
        best = max(t.reward for t in trials)
        assert store.resolve("e2e-best").hash == store.search_summary("e2e").best_pattern_hash
        assert store.search_summary("e2e").best_reward == best
        assert store.get_search("e2e").status == "completed"
        assert store.load_controller_state("e2e")


@pytest.mark.ray
@pytest.mark.slow
def test_random_controller_and_warm_start(ray_session, search_args):
    assert main(search_args("--trials", "2", "--controller", "random", "--name", "rand")) == 0
    assert main(search_args("--trials", "2", "--name", "first")) == 0
    assert main(search_args("--trials", "2", "--name", "second", "--warm-start", "first")) == 0
    with PatternStore(search_args.db) as store:
        assert [len(store.trials(name)) for name in ("rand", "first", "second")] == [2, 2, 2]
        assert store.get_search("rand").controller_settings["controller"] == "random"


@pytest.mark.ray
@pytest.mark.slow
def test_transformer_space_search_trains_the_gpt(ray_session, search_args, tmp_path):
    """The shipped transformer space end to end: span patterns go into the GPT language
    model, trials report perplexity-based rewards, and the best pattern is stored."""
    shipped = yaml.safe_load(search_spaces.loader.resolve("transformer").read_text())
    shipped["budget"].update(epochs=1, train_examples=4096, validation_examples=1024,
                             context=32)
    space = tmp_path / "transformer-small.yaml"
    space.write_text(yaml.safe_dump(shipped, sort_keys=False))
    # argparse keeps an option's last value: these replace the fixture's tiny/synthetic
    assert main(search_args("--space", str(space), "--dataset", "synthetic-text",
                            "--trials", "3", "--concurrent", "2", "--name", "lm")) == 0
    with PatternStore(search_args.db) as store:
        trials = store.trials("lm")
        assert len(trials) == 3 and {t.status for t in trials} == {"completed"}
        for trial in trials:
            last = trial.metrics[-1]
            assert last["val_perplexity"] > 1 and trial.reward == pytest.approx(
                ENAS_PERPLEXITY_SCALE / last["val_perplexity"])
        best = store.resolve("lm-best").pattern
        assert best.kind == "sequence" and len(best.sites) == 5
        assert best.space == "transformer"


@pytest.mark.ray
@pytest.mark.slow
def test_space_given_by_a_relative_path(ray_session, search_args, tmp_path, monkeypatch):
    """The driver parses ``--space valid.yaml`` once; the trials (each in its own working
    directory) get the parsed space, so they train instead of failing on the path."""
    folder = tmp_path / "dir"
    folder.mkdir()
    monkeypatch.chdir(folder)
    (folder / "valid.yaml").write_text(search_spaces.loader.resolve("tiny").read_text())
    assert main(search_args("--space", "valid.yaml", "--trials", "2", "--name", "rel",
                            "--seed", "3")) == 0
    with PatternStore(search_args.db) as store:
        trials = store.trials("rel")
        assert [t.status for t in trials] == ["completed", "completed"], [t.error for t in trials]
        assert store.get_search("rel").status == "completed"
        assert store.get_search("rel").controller_settings["seed"] == 3


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "autodropout", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("change,message", [
    (("--space", "nope"), "unknown search space 'nope'"),
    (("--dataset", "imagenet"), "--dataset must be one of [fashion-mnist, mnist, cifar-10"),
    (("--address", "127.0.0.1:1"), "--address: cannot reach Ray at 127.0.0.1:1"),
    (("--resume", "never-ran"), "--resume: no search named 'never-ran'"),
    (("--trials", "0"), "--trials must be a positive integer, got 0"),
    (("--set", "lr=fast"), "--set lr must be a number, got 'fast'"),
    (("--set", "layers=0"), "--set layers must be a positive integer, got 0"),
    (("--warm-start", "never-ran"), "--warm-start: no search named 'never-ran'"),
    (("--train-examples", "99999"), "--train-examples: 99999 is more than the 1920 examples"),
    (("--model", "resnet50"), "--model must be one of [wrn, gpt], got 'resnet50'"),
    (("--seed", "-1"), "--seed must be"),
    (("--scheduler", "asha"), "--asha-grace: 1 epochs leave ASHA no rung before the budget's 1 "
                              "epochs ("),
    (("--scheduler", "asha", "--epochs", "3", "--asha-grace", "3"),
     "--asha-grace: 3 epochs leave ASHA no rung before the budget's 3 epochs (--epochs)"),
    (("--scheduler", "asha", "--epochs", "3", "--asha-grace", "0"),
     "--asha-grace must be a positive integer, got 0"),
    (("--scheduler", "asha", "--epochs", "3", "--asha-reduction", "1"),
     "--asha-reduction must be a finite number > 1, got 1.0"),
    (("--asha-grace", "2", "--epochs", "3"), "--asha-grace sets the ASHA scheduler; add "
                                             "--scheduler asha"),
    (("--scheduler", "none", "--asha-reduction", "2"), "--asha-reduction sets the ASHA scheduler"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, change, message):
    db = tmp_path / "patterns.db"
    args = ["search", "--space", "tiny", "--dataset", "synthetic", "--db", f"sqlite:///{db}",
            "--experiments-dir", str(tmp_path / "experiments"), "--quiet", *change]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("autodropout: error: ") and message in captured.err
    assert not (tmp_path / "experiments").exists()
    if db.exists():
        with PatternStore(f"sqlite:///{db}") as store:
            assert store.searches() == []


def test_options_outside_the_cli_are_checked_by_the_service():
    from autodropout.errors import BadInput
    from controller.service import SearchOptions, check_options

    with pytest.raises(BadInput, match=r"--controller must be one of \[rl, random\], got 'grid'"):
        check_options(SearchOptions(controller="grid"))
    with pytest.raises(BadInput, match="--concurrent must be a positive integer, got 0"):
        check_options(SearchOptions(concurrent=0))


def test_unwritable_database_is_exit_2(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")  # tests run as root here, so permissions would not stop it
    result = run_cli("search", "--space", "tiny", "--dataset", "synthetic",
                     "--db", f"sqlite:///{not_a_folder / 'patterns.db'}", "--quiet",
                     "--experiments-dir", str(tmp_path / "experiments"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("autodropout: error: cannot open pattern store")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "experiments").exists()
    assert str(not_a_folder) in result.stderr and result.stdout == ""


def test_scheduler_settings_are_stored_and_a_resume_keeps_them(tmp_path, monkeypatch):
    """With the Tuner replaced (no Ray): ``--scheduler asha`` stores its settings and rungs
    with the search, the searcher gets the rungs, the Tuner ASHA; ``--resume`` keeps them."""
    import controller.service as service
    from autodropout.errors import BadInput
    from controller.service import SearchOptions, make_scheduler, scheduler_settings

    built = {}

    class Tuner:
        def fit(self):
            pass  # no trial ends: the search is stopped

    def build_tuner(options, space, budget, name, data, searcher, callbacks, seed):
        built.update(searcher=searcher, scheduler=make_scheduler(
            scheduler_settings(options, space, budget)))
        return Tuner()

    monkeypatch.setattr(service, "start_ray", lambda address: None)
    monkeypatch.setattr(service, "build_tuner", build_tuner)
    db = f"sqlite:///{tmp_path / 'patterns.db'}"
    args = ["search", "--space", "tiny", "--dataset", "synthetic", "--db", db, "--quiet",
            "--experiments-dir", str(tmp_path / "experiments"), "--name", "multi", "--epochs", "9",
            "--scheduler", "asha", "--asha-reduction", "3"]
    assert main(args) == 130
    with PatternStore(db) as store:
        stored = store.get_search("multi").controller_settings
    assert {key: stored[key] for key in stored if "asha" in key or key == "scheduler"} == {
        "scheduler": "asha", "asha_grace": 1, "asha_reduction": 3.0, "asha_max_t": 9,
        "asha_rungs": [1, 3]}
    assert (built["searcher"].rungs, built["searcher"].time_attr) == ((1, 3), "epoch")
    scheduler = built["scheduler"]
    assert type(scheduler).__name__ == "AsyncHyperBandScheduler"
    assert (scheduler._max_t, scheduler._reduction_factor, scheduler._time_attr) == \
        (9, 3.0, "epoch")
    assert [milestone for milestone, _ in scheduler._brackets[0]._rungs][-1] == 1  # grace
    space = search_spaces.load("tiny")
    resumed = SearchOptions(resume="multi")
    assert scheduler_settings(resumed, space, {"epochs": 9}, stored)["asha_rungs"] == [1, 3]
    with pytest.raises(BadInput, match="--scheduler: search 'multi' was started with scheduler "
                                       "asha; a resumed search keeps its scheduler"):
        scheduler_settings(SearchOptions(resume="multi", scheduler="none"), space, {}, stored)
    with pytest.raises(BadInput, match="--asha-grace: search 'multi' was started with asha_grace 1"):
        scheduler_settings(SearchOptions(resume="multi", asha_grace=2), space, {}, stored)
    # a search stored before schedulers existed resumes without one
    assert scheduler_settings(resumed, space, {}, {"seed": 0}) == {"scheduler": "none"}
    assert make_scheduler({"scheduler": "none"}) is None
    assert scheduler_settings(SearchOptions(), space, {"epochs": 1}) == {"scheduler": "none"}


@pytest.mark.ray
@pytest.mark.slow
def test_asha_search_end_to_end(ray_session, search_args, capsys):
    """Real trials under ASHA: stopped trials are stored early-stopped with their rung rewards
    in their history, and the controller's updates follow the rung rule."""
    from controller.controllers import deserialize_state

    assert main(search_args("--trials", "6", "--concurrent", "2", "--name", "asha", "--epochs", "3",
                            "--scheduler", "asha", "--asha-reduction", "2", "--seed", "0")) == 0
    out = capsys.readouterr().out
    assert "search asha: completed, 6 trials" in out
    with PatternStore(search_args.db) as store:
        trials = store.trials("asha")
        settings = store.get_search("asha").controller_settings
        state = deserialize_state(store.load_controller_state("asha"))
        summary = store.search_summary("asha")
    assert settings["scheduler"] == "asha" and settings["asha_rungs"] == [1, 2]
    assert {t.status for t in trials} <= {"completed", "early-stopped"}
    reached = []
    for trial in trials:
        epochs = [step["epoch"] for step in trial.metrics]
        assert epochs == list(range(1, len(epochs) + 1)) and trial.reward == trial.metrics[-1]["reward"]
        if trial.status == "early-stopped":
            assert epochs[-1] in (1, 2)  # stopped at a rung
        reached.append(epochs[-1])
    completed = sum(t.status == "completed" for t in trials)
    assert state["updates"] == sum(sum(r <= last for r in (1, 2)) for last in reached) + completed
    assert set(state["rung_baselines"]) <= {1, 2}
    assert summary.best_reward == max(t.reward for t in trials if t.status == "completed")
