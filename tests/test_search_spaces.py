import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import search_spaces
from autodropout.patterns import Pattern
from search_spaces import SpaceError

VALID = """\
name: mine
kind: conv
sites: 2
decisions:
  size_h: [1, 2]
  size_w: [3]
  stride: [4, 8, 16]
  repeat: [1, fill]
  rotate: [0, 45]
  shear_x: [0.0]
  shear_y: [-0.1, 0.1]
  share_c: [true, false]
  residual: [false]
"""


def test_shipped_spaces_load_and_count():
    assert search_spaces.available() == ["convnet", "tiny", "transformer"]
    convnet = search_spaces.load("convnet")
    assert convnet.kind == "conv" and convnet.num_sites == 3
    # 6*6*8*5*6*5*5*2*2*2*3 patterns per site (p_apply 2, p_tile 3 and strides 1, 3 for the
    # baselines), three sites; 6*6*6*5*6*5*5*2*2 (3 * 5.811575) before them
    assert convnet.log10_size == pytest.approx(3 * math.log10(5184000), abs=1e-9)
    assert convnet.max_drop == 0.5
    assert [site.map_size for site in convnet.sites] == [(28, 28), (14, 14), (7, 7)]
    transformer = search_spaces.load("transformer")
    assert transformer.kind == "sequence"
    assert [site.choices["apply_to"] for site in transformer.sites] == [
        (("embedding",),), (("attention_probs",),), (("attention_output",),),
        (("ffn_hidden",),), (("ffn_output",),)]
    tiny = search_spaces.load("tiny")
    assert len(tiny.decisions) == 5 and 10**tiny.log10_size == pytest.approx(32)


def test_user_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(VALID)
    space = search_spaces.load(str(path))
    assert space.name == "mine" and space.source == str(path) and space.yaml_text == VALID
    # fixed fields (one choice) are constants, not decisions
    assert [d.key for d in space.decisions[:6]] == [
        "site0.size_h", "site0.stride", "site0.repeat", "site0.rotate", "site0.shear_y", "site0.share_c"]
    pattern = space.decode([1, 2, 1, 1, 0, 1] * 2)
    assert pattern.sites[0]["size_w"] == 3 and pattern.sites[0]["repeat"] == "fill"
    assert pattern.sites[0]["rotate"] == 45.0 and pattern.sites[1]["share_c"] is False


MALFORMED = [
    ("unknown top-level key", VALID + "colour: red\n", ":14: colour: unknown key"),
    ("unknown decision", VALID.replace("  residual: [false]", "  residual: [false]\n  hue: [1]"),
     ":14: decisions.hue: unknown key"),
    ("empty choices", VALID.replace("stride: [4, 8, 16]", "stride: []"), ":7: decisions.stride: has no choices"),
    ("duplicate choice", VALID.replace("[4, 8, 16]", "[4, 8, 4]"), ":7: decisions.stride: duplicate choice 4"),
    ("duplicate key", VALID.replace("  size_w: [3]", "  size_w: [3]\n  size_w: [4]"),
     ":7: decisions.size_w: duplicate key"),
    ("out of range", VALID.replace("rotate: [0, 45]", "rotate: [0, 270]"),
     ":9: decisions.rotate: must be a finite number in [-180, 180], got 270"),
    ("wrong type", VALID.replace("share_c: [true, false]", "share_c: [yes please]"),
     ":12: decisions.share_c: must be true or false, got 'yes please'"),
    ("int expected", VALID.replace("size_h: [1, 2]", "size_h: [1.5]"),
     ":5: decisions.size_h: must be a positive integer, got 1.5"),
    ("missing decision", VALID.replace("  shear_x: [0.0]\n", ""), ":4: decisions.shear_x: missing"),
    ("unknown kind", VALID.replace("kind: conv", "kind: rnn"), ":2: kind: must be one of conv, sequence"),
    ("bad sites", VALID.replace("sites: 2", "sites: 0"), ":3: sites: must be a positive integer"),
    ("not yaml", "name: [unclosed\n", ":2: invalid YAML"),
    ("missing name", VALID.replace("name: mine\n", ""), ":1: name: missing"),
    ("bad budget", VALID + "budget:\n  epochs: 0\n", ":15: budget.epochs: must be a positive integer, got 0"),
    ("bad lr", VALID + "controller:\n  lr: -1\n", ":15: controller.lr: must be a positive finite number, got -1"),
    ("site override key", VALID.replace("sites: 2", "sites:\n  - {name: a, where: x}"),
     ":4: sites[0].where: unknown key"),
    ("empty file", "", ":1: (file): is empty"),
]


@pytest.mark.parametrize("text,message", [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_spaces_name_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as error:
        search_spaces.load(path)
    assert str(error.value).startswith(str(path) + ":"), str(error.value)
    assert message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_space_name():
    with pytest.raises(SpaceError, match="unknown search space 'nope'; shipped spaces: convnet"):
        search_spaces.load("nope")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "autodropout", *args], capture_output=True, text=True)


def test_cli_list_and_show(tmp_path):
    listing = run_cli("spaces", "list")
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["NAME", "convnet", "tiny", "transformer"]
    shown = run_cli("spaces", "show", "transformer")
    assert shown.returncode == 0 and "site 1 attention_probs" in shown.stdout
    path = tmp_path / "mine.yaml"
    path.write_text(VALID)
    assert "site 1 site1" in run_cli("spaces", "show", str(path)).stdout


def test_cli_bad_space_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(VALID.replace("[4, 8, 16]", "[4, 8, 4]"))
    result = run_cli("spaces", "show", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"autodropout: error: {path}:7: decisions.stride: duplicate choice 4\n"
    assert run_cli("spaces", "show", "nope").returncode == 2


SPACES = {name: search_spaces.load(name) for name in search_spaces.available()}


@st.composite
def space_and_indices(draw):
    space = SPACES[draw(st.sampled_from(sorted(SPACES)))]
    indices = [draw(st.integers(0, len(d.choices) - 1)) for d in space.decisions]
    return space, indices


@settings(max_examples=150, deadline=None)
@given(space_and_indices())
def test_encode_inverts_decode(case):
    space, indices = case
    pattern = space.decode(indices)
    assert space.encode(pattern) == indices
    assert Pattern.from_json(pattern.to_json()).hash == pattern.hash


@settings(max_examples=100, deadline=None)
@given(space_and_indices())
def test_decode_inverts_encode(case):
    space, indices = case
    pattern = Pattern.from_yaml(space.decode(indices).to_yaml())  # a pattern read back from a file
    assert space.decode(space.encode(pattern)) == pattern


def test_decode_and_encode_refuse_foreign_input():
    tiny = SPACES["tiny"]
    with pytest.raises(ValueError, match="expected 5 tokens, got 4"):
        tiny.decode([0, 0, 0, 0])
    with pytest.raises(ValueError, match="site0.size_w index 2 outside"):
        tiny.decode([0, 2, 0, 0, 0])
    foreign = SPACES["convnet"].decode([0] * len(SPACES["convnet"].decisions))
    with pytest.raises(ValueError, match="3 conv sites; space 'tiny' has 1"):
        tiny.encode(foreign)
    single = Pattern("conv", [foreign.sites[0]])
    with pytest.raises(ValueError, match=r"sites\[0\].size_h: 1 is not a choice of space 'tiny'"):
        tiny.encode(single)


def test_readme_lists_the_controller_settings_of_the_one_table():
    from pathlib import Path

    from search_spaces.settings import CONTROLLER_DEFAULTS, controller_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert controller_table() in readme
    assert len(controller_table().splitlines()) == 2 + len(CONTROLLER_DEFAULTS)


def test_cli_show_refuses_a_budget_a_search_would_refuse(tmp_path):
    path = tmp_path / "resnet.yaml"
    path.write_text(VALID + "budget:\n  model: resnet50\n")
    result = run_cli("spaces", "show", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"autodropout: error: {path}:15: budget.model must be one of "
                             "[wrn, gpt], got 'resnet50'\n")
