"""Built-in patterns: every shipped one loads, is guarded by its file's hash and its catalog
entry, and applies to the model it was found on; ``load_pattern``, ``patterns list|show``
and ``train`` reach them without a database of their own; ``write_builtin`` round-trips."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_store import PNG_SIGNATURE, run
from test_train_command import fake_training

import autodropout as ad
import autodropout.builtin
import autodropout.cli.patterns
import search_spaces
from autodropout.builtin import (
    BuiltinPattern,
    builtin_pattern,
    builtin_patterns,
    resolve_builtin,
    write_builtin,
)
from autodropout.builtin.catalog import ENTRY_KEYS, check_entry
from autodropout.cli import main
from autodropout.errors import BadInput, NotFound
from autodropout.patterns import Pattern, PatternError
from autodropout.patterns.files import read_pattern_file, write_pattern_file
from patterns_db import PatternStore
from workers.datasets import load_dataset
from workers.training import Budget, build_child

ROOT = Path(__file__).resolve().parent.parent
FOLDER = Path(autodropout.builtin.__file__).parent
NAMES = [builtin.name for builtin in builtin_patterns()]
WRN = "wrn-fashion-mnist"
"""The shipped ConvNet pattern, for the tests that need one."""
REPORT = "benchmarks/reports/search_quality"
NO_STORE = "sqlite:////nonexistent/folder/patterns.db"  # opening it would fail
MEASURED = {"metric": "test_accuracy", "seeds": [0, 1, 2], "mean": 0.83, "std": 0.004,
            "best_fixed": "dropblock:0.05:3", "vs_none": {"mean": 0.0095, "low": 0.001,
                                                         "high": 0.018},
            "vs_best_fixed": {"mean": 0.003, "low": -0.0035, "high": 0.0095}}


@pytest.fixture(params=NAMES)
def builtin(request) -> BuiltinPattern:
    return builtin_pattern(request.param)


@pytest.fixture
def copied(tmp_path) -> Path:
    """A copy of the shipped built-ins' folder."""
    folder = tmp_path / "builtin"
    folder.mkdir()
    for path in FOLDER.glob("*.json"):
        shutil.copy(path, folder)
    return folder


def other_pattern(pattern: Pattern) -> Pattern:
    """``pattern`` with its first site's stride changed: a different hash, the same shape."""
    data = pattern.to_dict()
    data["sites"][0]["stride"] = 4 if data["sites"][0]["stride"] != 4 else 6
    return Pattern.from_dict(data)


# -- shipped built-ins -----------------------------------------------------------------------
def test_the_shipped_patterns_are_the_search_quality_winners_with_their_test_scores():
    """Each built-in is its task's searched row of the committed search-quality report (the
    best by validation), with that row's validation score and final test scores."""
    results = json.loads((ROOT / REPORT / "results.json").read_text(encoding="utf-8"))
    assert WRN in NAMES
    for builtin in builtin_patterns():
        rows = [r for r in results["tasks"][builtin.dataset]["rows"] if r["pattern"]]
        pick = min if builtin.test["metric"] == "test_perplexity" else max
        row = pick(rows, key=lambda r: r["validation"])
        assert row["ref"] == f"pattern:{builtin.hash}"
        assert Pattern.from_dict(json.loads(row["pattern"])) == builtin.pattern
        assert builtin.validation["value"] == row["validation"]
        assert builtin.test["seeds"] == sorted(int(seed) for seed in row["test"])
        assert builtin.test["mean"] == pytest.approx(statistics.fmean(row["test"].values()))
        assert builtin.report == f"{REPORT}/results.md"


def test_a_builtin_loads_by_name_by_ref_and_through_load_pattern(builtin):
    for ref in (f"builtin:{builtin.name}", builtin.ref, f" {builtin.ref} "):
        assert resolve_builtin(ref) == builtin
        assert ad.load_pattern(ref) == builtin.pattern
    assert builtin in ad.builtin_patterns()
    assert builtin.pattern.hash == builtin.hash


def test_a_builtins_file_carries_its_hash_and_its_entry_is_complete(builtin):
    text = (FOLDER / builtin.file).read_text(encoding="utf-8")
    assert json.loads(text)["hash"] == builtin.hash
    assert read_pattern_file(FOLDER / builtin.file).hash == builtin.hash  # the file checks
    entry = builtin.entry()
    assert tuple(sorted(entry)) == tuple(sorted(ENTRY_KEYS))
    assert check_entry(entry) == entry
    assert len(builtin.map_shape) == (3 if builtin.pattern.kind == "conv" else 2)
    assert builtin.space == builtin.pattern.space and builtin.space in search_spaces.available()
    assert (ROOT / builtin.report).is_file()


def test_a_file_edited_after_shipping_is_refused(builtin, copied):
    path = copied / builtin.file
    data = json.loads(path.read_text(encoding="utf-8"))
    data["sites"][0]["stride"] = other_pattern(builtin.pattern).sites[0]["stride"]
    path.write_text(json.dumps(data), encoding="utf-8")  # the old hash stays
    with pytest.raises(PatternError, match=rf"{builtin.file}: hash: .* does not match"):
        builtin_pattern(builtin.name, copied)


def test_a_file_replaced_without_its_catalog_entry_is_refused(builtin, copied):
    write_pattern_file(other_pattern(builtin.pattern), copied / builtin.file)  # a valid hash
    with pytest.raises(PatternError, match="replaced without its entry"):
        builtin_patterns(copied)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _examples(bundle, budget, n=8):
    """``n`` test images, or ``n`` test sequences of the trials' context length."""
    if bundle.kind == "image":
        return bundle.test.images[:n].float() / 255
    return bundle.test[: n * budget.context].view(n, budget.context)


def test_a_builtin_applies_to_the_model_it_was_found_on(builtin, shared_data_dir):
    bundle = load_dataset(builtin.dataset, shared_data_dir, download=False)
    budget = Budget.from_mapping(search_spaces.load(builtin.space).budget,
                                 dataset=builtin.dataset, model=builtin.model)
    model, x = build_child(budget, bundle, 0, builtin.model_args), _examples(bundle, budget)
    snapshot = {name: value.clone() for name, value in model.state_dict().items()}
    hooks = _hook_count(model)
    reference = model.eval()(x)
    torch.manual_seed(3)
    train_reference = model.train()(x)
    model.load_state_dict(snapshot)

    handle = ad.apply_pattern(model.eval(), builtin.pattern)
    assert sorted(set(handle.assignment.values())) == list(range(len(builtin.pattern)))
    first = next(module for name, module in model.named_modules()
                 if handle.assignment.get(name) == 0)
    seen = []
    probe = first.register_forward_hook(lambda module, args, out: seen.append(out.shape[1:]))
    assert torch.equal(model(x), reference)
    probe.remove()
    assert tuple(seen[0]) == builtin.map_shape
    torch.manual_seed(3)
    assert not torch.equal(model.train()(x), train_reference)  # the pattern acts
    handle.remove()
    assert _hook_count(model) == hooks
    model.load_state_dict(snapshot)
    assert torch.equal(model.eval()(x), reference)


def test_unknown_names_and_versions_are_refused_naming_what_there_is():
    with pytest.raises(NotFound) as error:
        builtin_pattern("no-such")
    assert str(error.value) == (f"unknown built-in pattern 'no-such'; must be one of "
                                f"[{', '.join(NAMES)}]")
    with pytest.raises(NotFound, match="unknown built-in pattern 'no-such'"):
        ad.load_pattern("builtin:no-such")
    shipped = builtin_pattern(WRN)
    with pytest.raises(NotFound, match=rf"is version {shipped.version}, not {shipped.version + 1}"):
        ad.load_pattern(f"builtin:{shipped.name}@{shipped.version + 1}")
    with pytest.raises(BadInput, match="VERSION must be a positive integer, got 'new'"):
        resolve_builtin(f"builtin:{shipped.name}@new")


@pytest.mark.parametrize("code", [
    f"import autodropout as ad; ad.load_pattern('builtin:{NAMES[0]}')",
    "from autodropout.cli import main; main(['patterns', 'list', '--builtin'])",
    f"from autodropout.cli import main; main(['patterns', 'show', 'builtin:{NAMES[0]}'])",
])
def test_reading_builtins_loads_no_database_no_ray_and_no_torch(code):
    probe = (f"{code}\nimport sys\nprint('loaded:' + ','.join("
             "m for m in ('sqlalchemy', 'ray', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "loaded:", f"{code!r} {done.stdout.splitlines()[-1]}"


# -- CLI ---------------------------------------------------------------------------------------
def test_patterns_list_builtin_prints_a_table_and_json_without_a_store(capsys):
    code, out, _ = run(capsys, "patterns", "list", "--builtin", "--db", NO_STORE)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:6] == ["NAME", "VERSION", "KIND", "SPACE", "DATASET", "MODEL"]
    assert [row.split()[0] for row in rows] == NAMES
    code, out, _ = run(capsys, "patterns", "list", "--builtin", "--json", "--db", NO_STORE)
    listed = json.loads(out)
    assert code == 0 and [item["name"] for item in listed] == NAMES
    for item in listed:
        shipped = builtin_pattern(item["name"])
        assert item == {**shipped.entry(), "ref": shipped.ref, "kind": shipped.pattern.kind}


def test_patterns_list_builtin_filters_and_refuses_trial_filters(capsys):
    code, out, _ = run(capsys, "patterns", "list", "--builtin", "--dataset", "no-such")
    assert (code, out) == (0, "no built-in patterns match\n")
    shipped = builtin_pattern(WRN)
    code, out, _ = run(capsys, "patterns", "list", "--builtin", "--json", "--space",
                       shipped.space, "--kind", shipped.pattern.kind)
    assert code == 0 and shipped.name in [item["name"] for item in json.loads(out)]
    code, _, err = run(capsys, "patterns", "list", "--builtin", "--min-reward", "0.5")
    assert code == 2 and "--search and --min-reward filter stored trials" in err


def test_patterns_list_builtin_shows_measured_gains_and_unmeasured_ones(copied, monkeypatch,
                                                                         capsys):
    shipped = builtin_pattern(WRN)
    write_builtin(shipped.pattern, {**shipped.entry(), "test": MEASURED}, copied)
    write_builtin(other_pattern(shipped.pattern),
                  {**shipped.entry(), "name": "zz-unmeasured", "test": dict.fromkeys(MEASURED)},
                  copied)
    monkeypatch.setattr(autodropout.cli.patterns, "builtin_patterns",
                        lambda: builtin_patterns(copied))
    code, out, _ = run(capsys, "patterns", "list", "--builtin")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0
    assert re.search(r"\+0\.0095 \[\+0\.0010, \+0\.0180\] +\+0\.0030 \[-0\.0035, \+0\.0095\] "
                     r"\(dropblock:0\.05:3\)", rows[shipped.name])
    assert rows["zz-unmeasured"].count("not measured") == 2


def test_patterns_show_builtin_prints_provenance_and_renders_its_map_shape(builtin, tmp_path,
                                                                          monkeypatch, capsys):
    shapes, real = [], ad.render
    monkeypatch.setattr(ad, "render", lambda pattern, shape, path: (
        shapes.append(tuple(shape)), real(pattern, shape, path))[1])
    png = tmp_path / "masks.png"
    code, out, _ = run(capsys, "patterns", "show", builtin.ref, "--png", str(png),
                       "--db", NO_STORE)
    assert code == 0 and png.read_bytes().startswith(PNG_SIGNATURE)
    assert shapes == [builtin.map_shape]
    assert out.startswith(f"built-in pattern {builtin.ref}  {builtin.hash}\n")
    for text in (f"space          {builtin.space}", f"report         {builtin.report}",
                 f"sites ({len(builtin.pattern)}):", f"masks rendered to {png}"):
        assert text in out
    if builtin.test["vs_none"] is None:
        assert "vs none        not measured" in out
    other = (2, 9, 9) if builtin.pattern.kind == "conv" else (9, 5)
    code, _, _ = run(capsys, "patterns", "show", builtin.ref, "--png", str(png), "--shape",
                     ",".join(map(str, other)))
    assert code == 0 and shapes[-1] == other
    code, out, _ = run(capsys, "patterns", "show", f"builtin:{builtin.name}", "--json")
    shown = json.loads(out)
    assert shown["pattern"] == builtin.pattern.to_dict(with_hash=True)
    assert {key: shown[key] for key in ENTRY_KEYS} == builtin.entry()


def test_patterns_show_of_an_unknown_builtin_exits_1(capsys):
    code, _, err = run(capsys, "patterns", "show", "builtin:no-such", "--db", NO_STORE)
    assert code == 1 and "unknown built-in pattern 'no-such'; must be one of" in err


# -- write_builtin -----------------------------------------------------------------------------
def test_write_builtin_round_trips_and_upserts_sorted(tmp_path):
    shipped = builtin_pattern(WRN)
    entry = {key: value for key, value in shipped.entry().items() if key not in ("file", "hash")}
    written = write_builtin(shipped.pattern, entry, tmp_path)
    assert written == shipped
    assert (tmp_path / shipped.file).read_bytes() == (FOLDER / shipped.file).read_bytes()
    write_builtin(other_pattern(shipped.pattern), {**entry, "name": "a-first"}, tmp_path)
    measured = write_builtin(shipped.pattern, {**entry, "test": MEASURED}, tmp_path)
    assert measured.test == MEASURED and measured.version == shipped.version
    assert [builtin.name for builtin in builtin_patterns(tmp_path)] == ["a-first", shipped.name]
    catalog = json.loads((tmp_path / "catalog.json").read_text(encoding="utf-8"))
    assert [item["name"] for item in catalog["patterns"]] == ["a-first", shipped.name]
    assert catalog["patterns"][1] == measured.entry()


def test_a_changed_pattern_needs_a_higher_version(tmp_path):
    shipped = builtin_pattern(WRN)
    write_builtin(shipped.pattern, shipped.entry(), tmp_path)
    changed = other_pattern(shipped.pattern)
    with pytest.raises(BadInput, match=rf"version must be > {shipped.version}"):
        write_builtin(changed, shipped.entry(), tmp_path)
    assert builtin_pattern(shipped.name, tmp_path).hash == shipped.hash  # nothing written
    newer = write_builtin(changed, {**shipped.entry(), "version": shipped.version + 1}, tmp_path)
    assert newer.hash == changed.hash
    assert ad.load_pattern(f"builtin:{shipped.name}").hash == shipped.hash  # package untouched


def _broken(entry, path, value):
    """``entry`` with the field at ``path`` (keys joined by dots) set to ``value``; ``...``
    removes it."""
    *parents, last = path.split(".")
    target = entry
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return entry


@pytest.mark.parametrize(("path", "value", "message"), [
    ("version", 0, "version must be a positive integer, got 0"),
    ("name", "Bad Name", "name: must be lowercase letters, digits and '-'"),
    ("summary", "two\nlines", "summary: must be one line"),
    ("report", ..., "report: missing"),
    ("owner", "me", "owner: unknown field"),
    ("map_shape", [16, 28], "map_shape must have 3 sizes for a conv pattern"),
    ("space", "tiny", "space is 'tiny' but the pattern's is 'convnet'"),
    ("search.trials", 0, "search.trials must be a positive integer"),
    ("test", {**MEASURED, "vs_none": {"mean": 0.1, "low": 0.2, "high": 0.3}},
     "vs_none: must hold low <= mean <= high"),
    ("test", {**MEASURED, "std": None}, "must all be given, or all be null"),
    ("test", {**MEASURED, "best_fixed": None}, "best_fixed: must name the baseline"),
])
def test_a_malformed_entry_is_refused_naming_the_field_and_nothing_is_written(tmp_path, path,
                                                                            value, message):
    shipped = builtin_pattern(WRN)
    entry = _broken(shipped.entry(), path, value)
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace("[", r"\[")):
        write_builtin(shipped.pattern, entry, tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- train ---------------------------------------------------------------------------------------
def test_train_uses_the_builtins_catalog_space_unless_space_is_given(tmp_path, monkeypatch,
                                                                     capsys):
    calls = []
    fake_training(monkeypatch, calls)
    shipped = builtin_pattern(WRN)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    quick = ["--dataset", "synthetic", "--train-examples", "64", "--seeds", "1", "--db", db,
             "--quiet"]
    assert main(["train", "--regularizer", shipped.ref, *quick]) == 0
    space = search_spaces.load(shipped.space)
    assert calls[-1]["pattern"] == shipped.pattern
    assert calls[-1]["budget"].epochs == space.budget["epochs"]
    assert calls[-1]["sites"] == dict(enumerate(space.site_modules))
    out = capsys.readouterr().out
    assert f"with pattern {shipped.hash[:12]} ({shipped.ref})" in out
    assert f"budget of space {shipped.space!r}" in out
    assert main(["train", "--regularizer", shipped.ref, "--space", "tiny", *quick]) == 0
    assert calls[-1]["budget"].epochs == search_spaces.load("tiny").budget["epochs"]
    assert main(["train", "--regularizer", "builtin:no-such", *quick]) == 1
    assert "--regularizer: unknown built-in pattern 'no-such'" in capsys.readouterr().err


def test_train_with_a_builtin_stores_its_results(tmp_path, shared_data_dir, capsys):
    shipped = builtin_pattern(WRN)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["train", "--dataset", shipped.dataset, "--regularizer", f"builtin:{shipped.name}",
                 "--epochs", "1", "--seeds", "1", "--train-examples", "64", "--data-dir",
                 shared_data_dir, "--db", db, "--quiet"]) == 0
    assert f"stored 1 final evaluation of pattern {shipped.hash[:12]}" in capsys.readouterr().out
    with PatternStore(db) as store:
        (evaluation,) = store.final_evaluations(shipped.hash)
    assert (evaluation.dataset, evaluation.model, evaluation.seed) == (shipped.dataset,
                                                                       shipped.model, 0)
