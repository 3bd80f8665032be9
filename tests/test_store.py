"""PatternStore: searches, trials (idempotent, atomic), best, refs, tags, files, evaluations.

Every test runs on a temporary SQLite file and on PostgreSQL (``db_url`` fixture)."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import sys

import pytest
from sqlalchemy import create_engine, func, select

import autodropout
from autodropout.errors import BadInput, NotFound
from autodropout.patterns import Pattern, PatternError
from patterns_db import PatternStore, StoreError
from patterns_db.models import PatternRow, TrialMetricRow, TrialRow

SPACE_YAML = "name: wrn-space\nkind: conv\n"


def conv_pattern(size_h: int = 4, rotate: float = 0.0, space: str | None = "wrn-space") -> Pattern:
    site = {
        "size_h": size_h,
        "size_w": 4,
        "stride": 8,
        "repeat": "fill",
        "rotate": rotate,
        "shear_x": 0.0,
        "shear_y": 0.0,
        "share_c": True,
        "residual": False,
    }
    return Pattern("conv", [site], space=space)


def sequence_pattern(size: int = 3) -> Pattern:
    site = {
        "size": size,
        "stride": 8,
        "repeat": 2,
        "axis": "tokens",
        "share": False,
        "apply_to": ["attention_probs"],
    }
    return Pattern("sequence", [site], space="tfm-space")


@pytest.fixture
def store(db_url):
    with PatternStore(db_url) as opened:
        yield opened


@pytest.fixture
def search(store) -> str:
    store.create_search("s1", "wrn-space", SPACE_YAML, "fashion", "wrn-28-2", {"lr": 0.1})
    return "s1"


def count(db_url: str, column) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            return connection.execute(select(func.count(column))).scalar_one()
    finally:
        engine.dispose()


# searches ---------------------------------------------------------------------------------
def test_search_lifecycle(store):
    created = store.create_search(
        "s1", "wrn-space", SPACE_YAML, "fashion", "wrn-28-2", {"lr": 0.1, "entropy": [1, 2]}
    )
    assert (created.name, created.space_name, created.space_yaml) == ("s1", "wrn-space", SPACE_YAML)
    assert created.controller_settings == {"lr": 0.1, "entropy": [1, 2]}
    assert created.status == "running" and created.finished_at is None and created.host
    assert created.started_at.tzinfo is not None
    finished = store.finish_search("s1", "stopped")
    assert finished.status == "stopped" and finished.finished_at >= finished.started_at
    assert store.get_search("s1") == finished


def test_existing_search_needs_resume_with_the_same_task(store, search):
    with pytest.raises(BadInput, match="already exists"):
        store.create_search(search, "wrn-space", SPACE_YAML, "fashion", "wrn-28-2")
    with pytest.raises(BadInput, match="dataset: search 's1' has 'fashion', not 'cifar10'"):
        store.create_search(search, "wrn-space", SPACE_YAML, "cifar10", "wrn-28-2", resume=True)
    failed = store.finish_search(search, "failed", error="x" * 3000)
    assert failed.error == "x" * 2000 and store.search_summary(search).search.error == failed.error
    resumed = store.create_search(
        search, "wrn-space", SPACE_YAML, "fashion", "wrn-28-2", resume=True
    )
    assert resumed.status == "running" and resumed.finished_at is None and resumed.error is None
    with pytest.raises(BadInput, match="^error is for a failed search, not a completed one"):
        store.finish_search(search, "completed", error="boom")


def test_unknown_search_is_not_found(store):
    with pytest.raises(NotFound, match="no search named 'ghost'"):
        store.get_search("ghost")
    with pytest.raises(NotFound):
        store.record_trial("ghost", "t0", conv_pattern(), reward=0.5)
    with pytest.raises(NotFound):
        store.trials("ghost")


def test_bad_search_arguments_name_the_field(store):
    with pytest.raises(BadInput, match="^dataset must be a non-empty string"):
        store.create_search("s2", "space", SPACE_YAML, "", "m")
    with pytest.raises(BadInput, match="^controller_settings must hold only JSON"):
        store.create_search("s2", "space", SPACE_YAML, "d", "m", {"f": object()})
    store.create_search("s2", "space", SPACE_YAML, "d", "m")
    finished = r"\[completed, failed, stopped\]"
    with pytest.raises(BadInput, match=rf"^status must be one of {finished}, got 'running'"):
        store.finish_search("s2", "running")


def test_controller_state_round_trips(store, search):
    assert store.load_controller_state(search) is None
    store.save_controller_state(search, b"\x00state-1")
    store.save_controller_state(search, b"\x00state-2\xff")
    assert store.load_controller_state(search) == b"\x00state-2\xff"
    with pytest.raises(BadInput, match="^state must be bytes"):
        store.save_controller_state(search, "text")


# trials -----------------------------------------------------------------------------------
def test_record_trial_is_an_idempotent_upsert(store, search, db_url):
    store.record_trial(
        search, "t0", conv_pattern(2), status="running", metrics=[{"acc": 0.1}], node="n1"
    )
    first = store.trials(search)[0]
    store.record_trial(search, "t1", conv_pattern(3), reward=0.2)
    for _ in range(2):  # the same final write twice: one trial, no duplicated metrics
        store.record_trial(
            search,
            "t0",
            conv_pattern(5),
            reward=0.9,
            duration=12.5,
            node="n2",
            metrics=[{"acc": 0.3, "loss": 1.0}, {"acc": 0.5, "loss": 0.5}],
        )
    trials = store.trials(search)
    assert [t.trial_id for t in trials] == ["t0", "t1"]  # first-recorded order kept
    t0 = trials[0]
    assert (t0.status, t0.reward, t0.duration, t0.node) == ("completed", 0.9, 12.5, "n2")
    assert t0.pattern_hash == conv_pattern(5).hash
    assert t0.metrics == (
        {"step": 0, "acc": 0.3, "loss": 1.0},
        {"step": 1, "acc": 0.5, "loss": 0.5},
    )
    assert t0.created_at == first.created_at and t0.updated_at > first.updated_at
    assert count(db_url, TrialRow.id) == 2
    assert count(db_url, TrialMetricRow.value) == 4
    assert count(db_url, PatternRow.id) == 3


def test_same_trial_id_in_two_searches_are_two_trials(store, search):
    store.create_search("s2", "wrn-space", SPACE_YAML, "fashion", "wrn-28-2")
    store.record_trial(search, "t0", conv_pattern(2), reward=0.1)
    store.record_trial("s2", "t0", conv_pattern(2), reward=0.2)
    assert [t.reward for t in store.trials(search)] == [0.1]
    assert [t.reward for t in store.trials("s2")] == [0.2]


def test_metrics_keep_explicit_steps_nan_and_skip_unreported(store, search):
    store.record_trial(
        search,
        "t0",
        conv_pattern(),
        reward=0.5,
        metrics=[
            {"step": 5, "loss": float("nan"), "acc": 0.25},
            {"step": 10.0, "loss": math.inf, "acc": 1, "val_ppl": None},  # Tune's float step
        ],
    )
    (trial,) = store.trials(search)
    assert [m["step"] for m in trial.metrics] == [5, 10]
    assert math.isnan(trial.metrics[0]["loss"]) and trial.metrics[0]["acc"] == 0.25
    assert trial.metrics[1] == {"step": 10, "loss": math.inf, "acc": 1.0}
    assert store.trials(search, with_metrics=False)[0].metrics == ()


BAD_TRIALS = [
    (
        {"status": "done"},
        r"^status must be one of \[running, completed, failed, early-stopped\], got 'done'",
    ),
    ({"reward": math.nan}, "^reward must be a finite number"),
    ({"duration": -1.0}, "^duration must be a finite number >= 0, got -1.0"),
    ({"metrics": {"acc": 1.0}}, "^metrics must be a list of per-step mappings"),
    ({"metrics": [{"acc": "high"}]}, r"^metrics\[0\]\.acc must be a number"),
    ({"metrics": [{"acc": 1.0}, {"step": 0, "acc": 2.0}]}, r"^metrics\[1\]\.step: step 0"),
    ({"metrics": [{"step": 1.5, "acc": 2.0}]}, r"^metrics\[0\]\.step must be a non-negative"),
    (
        {"pattern": {"kind": "conv", "sites": [{"size_h": 4}]}},
        r"^pattern: sites\[0\]\.size_w: missing",
    ),
    ({"trial_id": ""}, "^trial_id must be a non-empty string"),
]


def test_bad_trials_are_refused_naming_the_field(store, search, db_url):
    call = {"search": search, "trial_id": "t0", "pattern": conv_pattern(), "reward": 0.5}
    for arguments, message in BAD_TRIALS:
        with pytest.raises(BadInput, match=message):
            store.record_trial(**{**call, **arguments})
    assert count(db_url, TrialRow.id) == 0 and count(db_url, PatternRow.id) == 0


def _crash_after_trial_insert(db_url: str) -> None:
    from sqlalchemy import event

    store = PatternStore(db_url)

    def die(connection, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO TRIALS"):
            import os

            os._exit(17)  # the process dies inside the transaction, before metrics and commit

    event.listen(store._engine, "after_cursor_execute", die)
    store.record_trial("s1", "t0", conv_pattern(7), reward=0.5, metrics=[{"acc": 0.5}])


def test_a_crash_mid_write_leaves_no_half_trial(store, search, db_url):
    # fork: the child needs no fresh interpreter to die in the middle of a write
    process = multiprocessing.get_context("fork").Process(
        target=_crash_after_trial_insert, args=(db_url,)
    )
    process.start()
    process.join(60)
    assert process.exitcode == 17
    assert store.trials(search) == []
    assert count(db_url, TrialRow.id) == 0 and count(db_url, PatternRow.id) == 0
    store.record_trial(search, "t0", conv_pattern(7), reward=0.5)  # the database is not locked
    assert len(store.trials(search)) == 1


# best -------------------------------------------------------------------------------------
def test_best_ranks_distinct_patterns_of_completed_trials(store, search):
    store.create_search("s2", "tfm-space", "name: tfm\n", "wmt", "transformer")
    store.record_trial(search, "a", conv_pattern(1), reward=0.50)
    store.record_trial(search, "b", conv_pattern(2), reward=0.70)
    store.record_trial(search, "c", conv_pattern(1), reward=0.80)  # same pattern as "a"
    store.record_trial(search, "d", conv_pattern(3), reward=0.95, status="early-stopped")
    store.record_trial(search, "e", conv_pattern(4), status="failed", error="CUDA OOM")
    store.record_trial("s2", "f", sequence_pattern(), reward=0.90)
    ranked = store.best(10)
    assert [(r.record.hash, r.reward, r.trial_id) for r in ranked] == [
        (sequence_pattern().hash, 0.90, "f"),
        (conv_pattern(1).hash, 0.80, "c"),
        (conv_pattern(2).hash, 0.70, "b"),
    ]
    top = ranked[1]
    assert (top.search, top.space, top.dataset, top.model) == (
        "s1",
        "wrn-space",
        "fashion",
        "wrn-28-2",
    )
    assert top.record.pattern == conv_pattern(1)
    assert [r.trial_id for r in store.best(1)] == ["f"]
    assert [r.trial_id for r in store.best(kind="conv")] == ["c", "b"]
    assert [r.trial_id for r in store.best(space="tfm-space")] == ["f"]
    assert [r.trial_id for r in store.best(dataset="fashion", model="wrn-28-2")] == ["c", "b"]
    assert [r.trial_id for r in store.best(min_reward=0.75)] == ["f", "c"]
    assert store.best(model="resnet") == []
    with pytest.raises(BadInput, match="^k must be a positive integer, got 0"):
        store.best(0)


def test_best_finds_k_distinct_patterns_behind_many_repeats(store, search):
    for i in range(30):  # the top 30 trials all tried the same pattern
        store.record_trial(search, f"r{i}", conv_pattern(9), reward=0.9 + i / 1000)
    for i in range(5):
        store.record_trial(search, f"o{i}", conv_pattern(1 + i), reward=0.1 * i)
    ranked = store.best(4)
    assert [r.trial_id for r in ranked] == ["r29", "o4", "o3", "o2"]


# references and tags ----------------------------------------------------------------------
def test_resolve_by_id_hash_prefix_and_tag(store):
    record = store.add_pattern(conv_pattern(2))
    assert store.add_pattern(conv_pattern(2)).id == record.id  # storing twice is a no-op
    assert store.resolve(record.id).hash == record.hash
    assert store.resolve(str(record.id)).hash == record.hash
    assert store.resolve(record.hash[:8].upper()).id == record.id
    assert store.resolve(record.hash).pattern == conv_pattern(2)
    tagged = store.tag(record.hash[:10], "wrn-fashion-best")
    assert tagged.tags == ("wrn-fashion-best",)
    assert store.resolve("wrn-fashion-best").id == record.id
    with pytest.raises(NotFound, match="no pattern with tag, id or hash prefix 'nothing'"):
        store.resolve("nothing")
    with pytest.raises(NotFound):
        store.resolve(record.id + 1000)
    with pytest.raises(NotFound):
        store.resolve(record.hash[:3])  # too short to be a prefix


def test_ambiguous_hash_prefix_is_refused(store):
    hashes = {}  # 4-digit prefixes collide among a few hundred patterns (birthday bound)
    for size in range(1, 20000):
        pattern = conv_pattern(size)
        clash = hashes.setdefault(pattern.hash[:4], pattern)
        if clash is not pattern:
            break
    store.add_pattern(clash)
    store.add_pattern(pattern)
    with pytest.raises(BadInput, match=f"hash prefix '{pattern.hash[:4]}' is ambiguous"):
        store.resolve(pattern.hash[:4])
    assert store.resolve(pattern.hash[:12]).hash == pattern.hash


def test_tags_move(store):
    first, second = store.add_pattern(conv_pattern(1)), store.add_pattern(conv_pattern(2))
    store.tag(first.id, "best")
    store.tag(second.id, "best")
    assert store.resolve("best").id == second.id
    assert store.resolve(first.id).tags == ()
    with pytest.raises(BadInput, match="^tag name must be letters, digits.*, got '12'"):
        store.tag(first.id, "12")
    with pytest.raises(BadInput, match="^tag name must be letters, digits.*, got 'a b'"):
        store.tag(first.id, "a b")
    assert store.tag(first.id, "2024-run-best").tags == ("2024-run-best",)
    with pytest.raises(NotFound):
        store.tag("missing", "other")


# files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_export_then_import_gives_the_same_hash(store, tmp_path, suffix):
    original = store.add_pattern(conv_pattern(3, rotate=12.5))
    path = tmp_path / f"best{suffix}"
    text = store.export(original.hash[:8], path=path)
    assert path.read_text() == text
    assert autodropout.load_pattern(path).hash == original.hash
    with PatternStore(f"sqlite:///{tmp_path / 'other.db'}") as other:
        imported = other.import_file(path)
        assert imported.hash == original.hash and imported.pattern.space == "wrn-space"
    assert store.import_file(path).id == original.id


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_an_exported_search_pattern_is_applied_where_the_search_applied_it(store, tmp_path,
                                                                            suffix):
    import search_spaces
    from workers.models import build_model
    from workers.training import site_selectors

    space = search_spaces.load("convnet")
    store.create_search("convnet-run", space.name, space.yaml_text, "fashion-mnist", "wrn")
    searched = space.decode([1] * len(space.decisions))
    store.record_trial("convnet-run", "t0", searched, reward=0.9)
    path = tmp_path / f"best{suffix}"
    store.export(searched.hash[:8], path=path)
    exported = autodropout.load_pattern(path)
    assert exported.hash == searched.hash and exported.space == "convnet"
    assert [place.to_dict() for place in exported.placement] == [
        {"name": f"stage{i}", "modules": f"group{i}.*.bn*", "map_size": [size, size]}
        for i, size in ((1, 28), (2, 14), (3, 7))]
    assert autodropout.load_pattern(searched.hash[:8], db=store._url).placement == (
        exported.placement)
    model = build_model("wrn", depth=16, width=1)
    search_time = autodropout.apply_pattern(model, searched,
                                            site_selectors(searched, space.site_modules))
    applied = autodropout.apply_pattern(model, exported)
    assert applied.rule == "placement" and applied.assignment == search_time.assignment
    assert "bn" not in applied.assignment  # the final BatchNorm is in no stage's glob


EDITS = [
    (lambda d: d["sites"][0].update(size_h=5), "hash: .* does not match the content"),
    (
        lambda d: d["sites"][0].update(size_h=-1),
        r"sites\[0\]\.size_h: must be a positive integer, got -1",
    ),
    (lambda d: d["sites"][0].update(dilation=2), r"sites\[0\]\.dilation: unknown field"),
    (lambda d: d.update(author="me"), "author: unknown field"),
    (lambda d: d.update(hash="abc"), "hash: must be 64 lowercase hex digits"),
    (lambda d: d.pop("kind"), "kind: missing"),
]


def test_edited_files_are_refused_naming_the_field(store, db_url, tmp_path):
    exported = store.export(store.add_pattern(conv_pattern()).id)
    for index, (edit, message) in enumerate(EDITS):
        data = json.loads(exported)
        edit(data)
        path = tmp_path / f"edited{index}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(PatternError, match=message):
            store.import_file(path)
    assert count(db_url, PatternRow.id) == 1


def test_corrupted_files_are_refused(store, db_url, tmp_path):
    text = store.export(store.add_pattern(conv_pattern()).id)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(PatternError, match="truncated.json: line .*: invalid JSON"):
        store.import_file(truncated)
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: conv\nsites: [\n")
    with pytest.raises(PatternError, match="broken.yaml: .*invalid YAML"):
        store.import_file(broken)
    with pytest.raises(NotFound, match="no such pattern file"):
        store.import_file(tmp_path / "missing.json")
    assert count(db_url, PatternRow.id) == 1


def test_load_pattern_reads_tags_ids_and_prefixes_from_the_store(store):
    record = store.tag(store.add_pattern(conv_pattern(6)).id, "wrn-fashion-best")
    for ref in ("wrn-fashion-best", str(record.id), record.hash[:10]):
        assert autodropout.load_pattern(ref, db=store._url).hash == record.hash
    with pytest.raises(NotFound):
        autodropout.load_pattern("nothing", db=store._url)


# final evaluations ------------------------------------------------------------------------
def test_final_evaluations_of_patterns_and_baselines(store):
    store.tag(store.add_pattern(conv_pattern()).id, "best")
    for seed, value in enumerate([0.95, 0.96]):
        store.add_final_evaluation("fashion", "wrn", seed, "test_acc", value, pattern="best")
    store.add_final_evaluation("fashion", "wrn", 0, "test_acc", 0.93, baseline="dropout-0.3")
    fresh = store.add_final_evaluation(
        "cifar10", "wrn", 0, "test_acc", 0.9, pattern=conv_pattern(8)
    )
    assert fresh.pattern_hash == conv_pattern(8).hash
    mine = store.final_evaluations("best")
    assert [(e.seed, e.value, e.pattern_hash) for e in mine] == [
        (0, 0.95, conv_pattern().hash),
        (1, 0.96, conv_pattern().hash),
    ]
    baselines = store.final_evaluations(dataset="fashion", model="wrn", baselines_only=True)
    assert [(e.baseline, e.value) for e in baselines] == [("dropout-0.3", 0.93)]
    assert len(store.final_evaluations(dataset="fashion")) == 3
    with pytest.raises(BadInput, match="^pattern, baseline: give exactly one"):
        store.add_final_evaluation("fashion", "wrn", 0, "test_acc", 0.9)
    with pytest.raises(BadInput, match="^value must be a finite number"):
        store.add_final_evaluation("fashion", "wrn", 0, "test_acc", math.nan, baseline="none")


# URLs and credentials ---------------------------------------------------------------------
@pytest.mark.postgres
def test_credentials_never_appear_in_logs_or_errors(pg_test_database, caplog):
    if pg_test_database is None:
        pytest.skip("AUTODROPOUT_TEST_PG_URL is not set")
    secret = "s3cr3t-P@ss"
    with_password = pg_test_database.set(password=secret)  # trust auth: the server ignores it
    caplog.set_level(logging.DEBUG)
    with PatternStore(with_password.render_as_string(hide_password=False)) as opened:
        assert secret not in repr(opened) and secret not in opened.url and "***" in opened.url
    unreachable = with_password.set(port=1).render_as_string(hide_password=False)
    with pytest.raises(StoreError) as error:
        PatternStore(unreachable)
    assert "cannot open pattern store" in str(error.value) and secret not in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert secret not in caplog.text and "s3cr3t" not in caplog.text


def test_sqlite_store_uses_wal_and_a_busy_timeout(tmp_path):
    path = tmp_path / "deep" / "dir" / "patterns.db"
    with PatternStore(str(path)) as opened, opened._engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


@pytest.mark.postgres
def test_postgres_commits_are_durable_unless_the_url_opts_out(pg_test_database):
    if pg_test_database is None:
        pytest.skip("AUTODROPOUT_TEST_PG_URL is not set")
    faster = pg_test_database.update_query_dict({"options": "-csynchronous_commit=off"})
    for url, expected in ((pg_test_database, "on"), (faster, "off")):
        with PatternStore(url) as opened, opened._engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == expected


def test_read_only_open_of_a_missing_sqlite_file_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no pattern store at"):
        PatternStore(str(tmp_path / "none.db"), create=False)
    assert not (tmp_path / "none.db").exists()


def test_unsupported_backends_are_refused():
    with pytest.raises(StoreError, match="backend 'mysql' is not supported"):
        PatternStore("mysql://user:pw@localhost/db")


def test_load_pattern_from_a_file_needs_no_database(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text(conv_pattern().to_yaml())  # a hand-written file: no hash field
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # importing them now fails
    monkeypatch.setitem(sys.modules, "patterns_db.store", None)
    assert autodropout.load_pattern(path).hash == conv_pattern().hash
    assert autodropout.load_pattern(str(path)).hash == conv_pattern().hash
    with pytest.raises(ImportError):
        autodropout.load_pattern("some-tag")
