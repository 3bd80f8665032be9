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
