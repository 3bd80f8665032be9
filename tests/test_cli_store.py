"""``autodropout patterns ...`` and ``autodropout searches ...`` on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
import yaml
from sqlalchemy import create_engine, func, select

from autodropout.cli import main
from autodropout.patterns import Pattern
from patterns_db import PatternStore
from patterns_db.models import PatternRow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LIST_KEYS = {"id", "hash", "kind", "reward", "search", "trial", "space", "dataset", "model", "tags"}
SEARCH_KEYS = {
    "name",
    "space",
    "dataset",
    "model",
    "status",
    "host",
    "started_at",
    "finished_at",
    "trials",
    "trials_by_status",
    "best_reward",
    "best_trial",
    "best_hash",
    "error",
}


def conv_pattern(size_h: int) -> Pattern:
    site = {
        "size_h": size_h,
        "size_w": 4,
        "stride": 8,
        "repeat": "fill",
        "rotate": 0.0,
        "shear_x": 0.0,
        "shear_y": 0.0,
        "share_c": True,
        "residual": False,
    }
    return Pattern("conv", [site], space="wrn-space")


def sequence_pattern() -> Pattern:
    site = {
        "size": 2,
        "stride": 4,
        "repeat": "fill",
        "axis": "tokens",
        "share": True,
        "apply_to": ["ffn_hidden"],
    }
    return Pattern("sequence", [site], space="tfm-space")


@pytest.fixture
def filled(db_url) -> str:
    """A store with two searches, five trials, a tag and final evaluations."""
    with PatternStore(db_url) as store:
        store.create_search(
            "wrn-fashion", "wrn-space", "x: 1\n", "fashion", "wrn-28-2", {"lr": 0.1}
        )
        store.create_search("tfm-wmt", "tfm-space", "y: 2\n", "wmt", "transformer")
        for trial, (size_h, reward) in enumerate([(2, 0.61), (3, 0.72), (2, 0.55), (5, 0.93)]):
            store.record_trial("wrn-fashion", f"t{trial}", conv_pattern(size_h), reward=reward)
        store.record_trial("wrn-fashion", "t4", conv_pattern(6), status="failed", error="OOM")
        store.record_trial("tfm-wmt", "t0", sequence_pattern(), reward=0.8)
        store.finish_search("tfm-wmt")
        store.tag(conv_pattern(5).hash[:8], "wrn-fashion-best")
        for seed, value in enumerate([0.951, 0.955]):
            store.add_final_evaluation(
                "fashion", "wrn-28-2", seed, "test_acc", value, pattern="wrn-fashion-best"
            )
        store.add_final_evaluation("fashion", "wrn-28-2", 0, "test_acc", 0.94, baseline="dropout")
    return db_url


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stored_patterns(db_url: str) -> int:
    engine = create_engine(db_url)
    with engine.connect() as connection:
        stored = connection.execute(select(func.count(PatternRow.id))).scalar_one()
    engine.dispose()
    return stored


def test_patterns_list_prints_an_aligned_table(filled, capsys):
    code, out, _ = run(capsys, "patterns", "list", "--db", filled)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "HASH",
        "KIND",
        "REWARD",
        "SEARCH",
        "TRIAL",
        "SPACE",
        "DATASET",
        "MODEL",
        "TAGS",
    ]
    ranked, untried = lines[1:5], lines[5:]
    assert [line.split()[3] for line in ranked] == ["0.9300", "0.8000", "0.7200", "0.6100"]
    assert "wrn-fashion-best" in lines[1]
    columns = [lines[0].index(name) for name in ("KIND", "SEARCH", "DATASET")]
    for line in lines[1:]:  # left-aligned columns start at their header
        assert [line[c - 1] for c in columns] == [" "] * 3 and all(line[c] != " " for c in columns)
    assert len({line.index(line.split()[3]) + len(line.split()[3]) for line in lines[:5]}) == 1
    # the pattern whose only trial failed has no reward: an empty cell, listed last
    reward_end = lines[0].index("REWARD") + len("REWARD")
    assert len(untried) == 1 and conv_pattern(6).hash[:12] in untried[0]
    assert untried[0][reward_end - 6:reward_end].strip() == ""


def test_patterns_list_json_is_stable_and_filters(filled, capsys):
    code, out, _ = run(
        capsys, "patterns", "list", "--db", filled, "--json", "--dataset", "fashion", "--top", "2"
    )
    rows = json.loads(out)
    assert code == 0 and [set(row) for row in rows] == [LIST_KEYS, LIST_KEYS]
    assert rows[0] == {
        "id": rows[0]["id"],
        "hash": conv_pattern(5).hash,
        "kind": "conv",
        "reward": 0.93,
        "search": "wrn-fashion",
        "trial": "t3",
        "space": "wrn-space",
        "dataset": "fashion",
        "model": "wrn-28-2",
        "tags": ["wrn-fashion-best"],
    }
    assert rows[1]["hash"] == conv_pattern(3).hash
    _, out, _ = run(capsys, "patterns", "list", "--db", filled, "--json", "--space", "tfm-space")
    assert [row["trial"] for row in json.loads(out)] == ["t0"]
    _, out, _ = run(capsys, "patterns", "list", "--db", filled, "--model", "none")
    assert out.strip() == "no patterns match"


def test_patterns_list_shows_imported_patterns_without_a_reward(db_url, tmp_path, capsys):
    path = tmp_path / "imported.json"
    path.write_text(json.dumps(conv_pattern(7).to_dict(with_hash=True)))
    PatternStore(db_url).close()
    _, out, _ = run(capsys, "patterns", "list", "--db", db_url)
    assert out.strip() == "no patterns stored"
    assert run(capsys, "patterns", "import", "--db", db_url, str(path))[0] == 0
    code, out, _ = run(capsys, "patterns", "list", "--db", db_url, "--json")
    (row,) = json.loads(out)
    assert code == 0 and set(row) == LIST_KEYS
    assert row["hash"] == conv_pattern(7).hash and row["reward"] is None and row["trial"] is None
    code, out, _ = run(capsys, "patterns", "list", "--db", db_url)
    assert code == 0 and conv_pattern(7).hash[:12] in out.splitlines()[1]
    _, out, _ = run(capsys, "patterns", "list", "--db", db_url, "--json", "--kind", "sequence")
    assert json.loads(out) == []
    _, out, _ = run(capsys, "patterns", "list", "--db", db_url, "--json", "--dataset", "fashion")
    assert json.loads(out) == []  # trial filters select trials; an imported pattern has none


def test_patterns_show_gives_parameters_provenance_reward_and_evaluations(filled, capsys):
    code, out, _ = run(capsys, "patterns", "show", "--db", filled, "wrn-fashion-best")
    assert code == 0
    assert out.splitlines()[0].endswith(f"  {conv_pattern(5).hash}")
    assert "size_h=5 size_w=4 stride=8 repeat=fill" in out
    assert "best reward  0.9300" in out
    assert "wrn-fashion  t3     completed  0.9300" in out
    assert "test_acc  pattern" in out and "0.9530" in out and "baseline:dropout" in out
    code, out, _ = run(
        capsys, "patterns", "show", "--db", filled, "--json", conv_pattern(2).hash[:10]
    )
    shown = json.loads(out)
    assert set(shown) == {
        "id",
        "hash",
        "kind",
        "space",
        "tags",
        "created_at",
        "pattern",
        "best_reward",
        "trials",
        "final_evaluations",
    }
    assert shown["best_reward"] == 0.61 and shown["tags"] == [] and shown["space"] == "wrn-space"
    assert [(t["trial"], t["reward"]) for t in shown["trials"]] == [("t0", 0.61), ("t2", 0.55)]
    assert Pattern.from_dict(
        {k: v for k, v in shown["pattern"].items() if k != "hash"}
    ) == conv_pattern(2)


def test_patterns_show_png_renders_the_mask(filled, capsys, tmp_path):
    for ref in ("wrn-fashion-best", sequence_pattern().hash[:8]):
        png = tmp_path / f"{ref}.png"
        code, out, _ = run(capsys, "patterns", "show", "--db", filled, ref, "--png", str(png))
        assert code == 0 and png.read_bytes().startswith(PNG_SIGNATURE)
    code, _, err = run(
        capsys,
        "patterns",
        "show",
        "--db",
        filled,
        "wrn-fashion-best",
        "--png",
        str(tmp_path / "x.png"),
        "--shape",
        "32,32",
    )
    assert code == 2 and "--shape: shape must be (C, H, W)" in err


def test_export_import_round_trip_keeps_the_hash(filled, capsys, tmp_path):
    code, out, _ = run(capsys, "patterns", "export", "--db", filled, "wrn-fashion-best")
    assert code == 0 and json.loads(out)["hash"] == conv_pattern(5).hash
    path = tmp_path / "best.yaml"
    code, _, _ = run(
        capsys, "patterns", "export", "--db", filled, "wrn-fashion-best", "-o", str(path)
    )
    assert code == 0 and yaml.safe_load(path.read_text())["hash"] == conv_pattern(5).hash
    other = f"sqlite:///{tmp_path / 'other.db'}"
    code, out, _ = run(capsys, "patterns", "import", "--db", other, str(path), "--json")
    assert code == 0 and json.loads(out) == {
        "id": 1,
        "hash": conv_pattern(5).hash,
        "kind": "conv",
        "tags": [],
    }
    code, out, _ = run(capsys, "patterns", "export", "--db", filled, "1", "--format", "yaml")
    assert code == 0 and yaml.safe_load(out)["kind"] == "conv"


def test_export_and_show_carry_the_placement_of_the_search_space(db_url, capsys):
    import search_spaces

    space = search_spaces.load("convnet")
    pattern = space.decode([0] * len(space.decisions))
    with PatternStore(db_url) as store:
        store.create_search("run", space.name, space.yaml_text, "fashion-mnist", "wrn")
        store.record_trial("run", "t0", pattern, reward=0.5)
    code, out, _ = run(capsys, "patterns", "export", "--db", db_url, pattern.hash[:8])
    exported = json.loads(out)
    assert code == 0 and exported["format"] == "autodropout.pattern/2"
    assert exported["placement"][1] == {"name": "stage2", "modules": "group2.*.bn*",
                                        "map_size": [14, 14]}
    code, out, _ = run(capsys, "patterns", "show", "--db", db_url, pattern.hash[:8])
    assert code == 0 and "  [2] stage3 on group3.*.bn* (7x7): size_h=1 " in out


def test_import_refuses_bad_files_and_writes_nothing(filled, capsys, tmp_path):
    with PatternStore(filled) as store:
        data = json.loads(store.export("wrn-fashion-best"))
    data["sites"][0]["dilation"] = 2
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(data))
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"kind": "conv", "sites": [')
    before = stored_patterns(filled)
    code, _, err = run(capsys, "patterns", "import", "--db", filled, str(unknown))
    assert code == 2 and "sites[0].dilation: unknown field" in err
    code, _, err = run(capsys, "patterns", "import", "--db", filled, str(malformed))
    assert code == 2 and "malformed.json: line 1: invalid JSON" in err
    code, _, err = run(capsys, "patterns", "import", "--db", filled, str(tmp_path / "none.json"))
    assert code == 1 and "no such pattern file" in err
    assert stored_patterns(filled) == before


def test_tag_then_resolve_by_tag(filled, capsys):
    code, out, _ = run(
        capsys, "patterns", "tag", "--db", filled, conv_pattern(3).hash[:6], "runner-up"
    )
    assert code == 0 and out.startswith("tag runner-up -> pattern")
    _, out, _ = run(capsys, "patterns", "show", "--db", filled, "runner-up", "--json")
    assert json.loads(out)["hash"] == conv_pattern(3).hash
    code, _, err = run(capsys, "patterns", "tag", "--db", filled, "runner-up", "123")
    assert code == 2 and "tag name" in err


def test_unknown_refs_exit_1_and_bad_input_exits_2(filled, capsys, tmp_path):
    assert run(capsys, "patterns", "show", "--db", filled, "nothing-here")[0] == 1
    assert run(capsys, "patterns", "export", "--db", filled, "deadbeef")[0] == 1
    assert run(capsys, "searches", "show", "--db", filled, "ghost")[0] == 1
    code, _, err = run(capsys, "patterns", "list", "--db", str(tmp_path / "missing.db"))
    assert code == 1 and "no pattern store at" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["patterns", "list", "--db", filled, "--top", "0"])
    assert exit_info.value.code == 2


def test_searches_list_and_show(filled, capsys, tmp_path):
    code, out, _ = run(capsys, "searches", "list", "--db", filled)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "STATUS", "SPACE"]
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [
        ["wrn-fashion", "running"],
        ["tfm-wmt", "completed"],
    ]
    _, out, _ = run(capsys, "searches", "list", "--db", filled, "--json")
    rows = json.loads(out)
    assert [set(row) for row in rows] == [SEARCH_KEYS, SEARCH_KEYS]
    assert rows[0]["trials_by_status"] == {"completed": 4, "failed": 1}
    assert (rows[0]["trials"], rows[0]["best_reward"], rows[0]["best_trial"]) == (5, 0.93, "t3")
    png = tmp_path / "curve.png"
    code, out, _ = run(capsys, "searches", "show", "--db", filled, "wrn-fashion", "--png", str(png))
    assert code == 0 and png.read_bytes().startswith(PNG_SIGNATURE)
    assert "trials       5 (completed 4, failed 1)" in out
    assert f"best so far  0.9300  trial t3  pattern {conv_pattern(5).hash[:12]}" in out
    table = out[out.index("trials (5, in the order recorded):"):].splitlines()
    assert table[1].split() == ["TRIAL", "STATUS", "REWARD", "EPOCHS", "PATTERN", "ERROR"]
    assert table[5].split() == ["t3", "completed", "0.9300", "0", conv_pattern(5).hash[:12]]
    assert table[6].split() == ["t4", "failed", "-", "0", conv_pattern(6).hash[:12], "OOM"]
    _, out, _ = run(capsys, "searches", "show", "--db", filled, "wrn-fashion", "--json")
    shown = json.loads(out)
    assert set(shown) == SEARCH_KEYS | {"controller_settings", "curve", "trial_table"}
    assert shown["trial_table"][3] == {"trial": "t3", "status": "completed", "reward": 0.93,
                                       "epochs": 0, "pattern": conv_pattern(5).hash,
                                       "error": None}
    assert shown["controller_settings"] == {"lr": 0.1}
    assert [(p["trial"], p["best_so_far"]) for p in shown["curve"]] == [
        ("t0", 0.61),
        ("t1", 0.72),
        ("t2", 0.72),
        ("t3", 0.93),
        ("t4", 0.93),
    ]
