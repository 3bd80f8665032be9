import json
import pickle
from types import MappingProxyType

import pytest

from autodropout import Pattern, PatternError

CONV_SITE = dict(size_h=4, size_w=2, stride=8, repeat="fill", rotate=45, shear_x=0.0,
                 shear_y=-0.15, share_c=True, residual=False)
SEQ_SITE = dict(size=3, stride=5, repeat=2, axis="tokens", share=False,
                apply_to=["ffn_output", "embedding"])


def test_canonical_json_is_sorted_compact_and_normalised():
    pattern = Pattern("conv", [CONV_SITE], space="tiny")
    text = pattern.to_json()
    assert " " not in text
    data = json.loads(text)
    assert list(data) == sorted(data) and list(data["sites"][0]) == sorted(data["sites"][0])
    assert data["sites"][0]["rotate"] == 45.0 and '"rotate":45.0' in text  # int 45 stored as float
    assert data["format"] == "autodropout.pattern/1"


def test_hash_is_content_identity():
    a = Pattern("conv", [CONV_SITE], space="tiny")
    b = Pattern("conv", [dict(CONV_SITE, rotate=45.0)], space="convnet")  # metadata differs
    assert a.hash == b.hash and a == b and len(a.hash) == 64
    c = Pattern("conv", [dict(CONV_SITE, rotate=30)])
    assert c.hash != a.hash and c != a
    # apply_to order does not matter: it is canonicalised to the sub-layer order
    s1 = Pattern("sequence", [SEQ_SITE])
    s2 = Pattern("sequence", [dict(SEQ_SITE, apply_to=["embedding", "ffn_output"])])
    assert s1.hash == s2.hash and s1.sites[0]["apply_to"] == ("embedding", "ffn_output")


def test_known_hash_is_stable_across_versions():
    # A stored pattern's identity must never change: this value is pinned on purpose.
    assert Pattern("conv", [CONV_SITE]).hash == "3479f239c4fd98742f96701a9e5f1c8e4d1288dafaa4c7e39d10a9793ce3aaea"


@pytest.mark.parametrize("kind,site", [("conv", CONV_SITE), ("sequence", SEQ_SITE)])
def test_round_trips_exactly(tmp_path, kind, site):
    pattern = Pattern(kind, [site, site], space="x")
    for name in ("p.json", "p.yaml", "p.yml"):
        path = pattern.save(tmp_path / name)
        loaded = Pattern.load(path)
        assert loaded.to_json() == pattern.to_json() and loaded.space == "x"
    assert Pattern.from_yaml(pattern.to_yaml()).to_json() == pattern.to_json()


def test_immutable():
    pattern = Pattern("conv", [CONV_SITE])
    assert isinstance(pattern.sites[0], MappingProxyType)
    with pytest.raises(TypeError):
        pattern.sites[0]["stride"] = 2
    with pytest.raises(AttributeError):
        pattern.kind = "sequence"


@pytest.mark.parametrize("data,message", [
    ({"kind": "conv", "sites": [CONV_SITE], "colour": 1}, "colour: unknown field"),
    ({"kind": "conv", "sites": [dict(CONV_SITE, hue=1)]}, "sites[0].hue: unknown field for a conv site"),
    ({"kind": "conv", "sites": [{k: v for k, v in CONV_SITE.items() if k != "stride"}]},
     "sites[0].stride: missing"),
    ({"kind": "conv", "sites": [dict(CONV_SITE, size_h="4")]}, "sites[0].size_h: must be a positive integer, got '4'"),
    ({"kind": "conv", "sites": [dict(CONV_SITE, size_h=True)]}, "sites[0].size_h: must be a positive integer, got True"),
    ({"kind": "conv", "sites": [dict(CONV_SITE, stride=0)]}, "sites[0].stride: must be a positive integer, got 0"),
    ({"kind": "conv", "sites": [dict(CONV_SITE, rotate=181)]}, "sites[0].rotate: must be a finite number in [-180, 180], got 181"),
    ({"kind": "conv", "sites": [dict(CONV_SITE, shear_x=float("nan"))]}, "sites[0].shear_x: must be a finite number in [-1, 1], got nan"),
    ({"kind": "conv", "sites": [dict(CONV_SITE, share_c=1)]}, "sites[0].share_c: must be true or false, got 1"),
    ({"kind": "conv", "sites": [dict(CONV_SITE, repeat="all")]}, "sites[0].repeat: must be a positive integer or 'fill', got 'all'"),
    ({"kind": "sequence", "sites": [dict(SEQ_SITE, axis="time")]}, "sites[0].axis: must be one of tokens"),
    ({"kind": "sequence", "sites": [dict(SEQ_SITE, apply_to=[])]}, "apply_to: must be a non-empty list"),
    ({"kind": "sequence", "sites": [dict(SEQ_SITE, apply_to=["mlp"])]}, "apply_to: 'mlp' is not one of"),
    ({"kind": "conv", "sites": []}, "sites: must hold at least one site"),
    ({"kind": "cnn", "sites": [CONV_SITE]}, "kind: must be one of conv, sequence"),
    ({"sites": [CONV_SITE]}, "kind: missing"),
    ({"kind": "conv", "sites": [CONV_SITE], "format": "other/9"},
     "format: unsupported 'other/9' (must be one of [autodropout.pattern/1, autodropout.pattern/2])"),
    ({"kind": "conv", "sites": [CONV_SITE], "placement": [{"name": "a"}],
      "format": "autodropout.pattern/1"}, "placement: needs format 'autodropout.pattern/2'"),
    ({"kind": "conv", "sites": [CONV_SITE], "placement": [{"name": "a"}, {"name": "b"}]},
     "placement: must have one entry per site (1), got 2"),
    ({"kind": "conv", "sites": [CONV_SITE, CONV_SITE], "placement": [{"name": "a"}] * 2},
     "placement: site name 'a' is given twice"),
    ({"kind": "conv", "sites": [CONV_SITE], "placement": {"name": "a"}},
     "placement: must be a list with one entry per site"),
    ({"kind": "conv", "sites": [CONV_SITE], "placement": [{"modules": "x"}]},
     "placement[0].name: missing"),
    ({"kind": "conv", "sites": [CONV_SITE], "placement": [{"name": "a", "glob": "x"}]},
     "placement[0].glob: unknown field (must be one of [name, modules, map_size])"),
    ({"kind": "conv", "sites": [CONV_SITE], "placement": [{"name": "a", "modules": ""}]},
     "placement[0].modules: must be a non-empty string, got ''"),
    ({"kind": "conv", "sites": [CONV_SITE], "placement": [{"name": "a", "map_size": [28, 0]}]},
     "placement[0].map_size: must be a positive integer or a list of two, got [28, 0]"),
    ([1, 2], "a pattern must be a mapping"),
])
def test_malformed_patterns_name_the_field(data, message):
    with pytest.raises(PatternError) as error:
        Pattern.from_dict(data, source="p.json")
    assert str(error.value).startswith("p.json: ")
    assert message in str(error.value)


def test_bad_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"kind": "conv",\n "sites": [}')
    with pytest.raises(PatternError, match=r"broken.json: line 2: invalid JSON"):
        Pattern.load(broken)
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("kind: conv\nsites: [\n")
    with pytest.raises(PatternError, match=r"broken.yaml: line 3: invalid YAML"):
        Pattern.load(broken_yaml)
    with pytest.raises(PatternError, match="missing.json: cannot read"):
        Pattern.load(tmp_path / "missing.json")


def test_exported_hash_guards_against_edits(tmp_path):
    pattern = Pattern("conv", [CONV_SITE])
    exported = tmp_path / "p.yaml"
    exported.write_text(pattern.to_yaml(with_hash=True))
    assert Pattern.load(exported).hash == pattern.hash
    exported.write_text(exported.read_text().replace("stride: 8", "stride: 9"))
    with pytest.raises(PatternError, match=r"p.yaml: hash: .* does not match the content"):
        Pattern.load(exported)
    with pytest.raises(PatternError, match="hash: must be 64 lowercase hex digits"):
        Pattern.from_dict({**pattern.to_dict(), "hash": "abc"})


PLACED = [{"name": "stage1", "modules": "group1.*.bn*", "map_size": 28},
          {"name": "stage2", "map_size": [14, 12]}]


def test_placement_is_metadata_that_round_trips_in_format_2(tmp_path):
    plain = Pattern("conv", [CONV_SITE, CONV_SITE])
    placed = Pattern("conv", [CONV_SITE, CONV_SITE], placement=PLACED)
    assert placed.hash == plain.hash and placed == plain  # not part of the identity
    assert [p.map_size for p in placed.placement] == [(28, 28), (14, 12)]
    assert placed.placement[1].modules is None
    data = placed.to_dict()
    assert data["format"] == "autodropout.pattern/2" and plain.to_dict()["format"].endswith("/1")
    assert data["placement"] == [{"name": "stage1", "modules": "group1.*.bn*", "map_size": [28, 28]},
                                 {"name": "stage2", "map_size": [14, 12]}]
    for name in ("p.json", "p.yaml"):
        loaded = Pattern.load(placed.save(tmp_path / name))
        assert loaded.placement == placed.placement and loaded.to_json() == placed.to_json()
    assert pickle.loads(pickle.dumps(placed)).placement == placed.placement
    assert Pattern("conv", [CONV_SITE, CONV_SITE], placement=placed.placement).to_json() == (
        placed.to_json())


def test_format_1_files_still_load(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "autodropout.pattern/1", "kind": "conv",
                               "sites": [CONV_SITE], "space": "tiny"}))
    loaded = Pattern.load(old)
    assert loaded.placement is None and loaded.space == "tiny"
    assert loaded.hash == "3479f239c4fd98742f96701a9e5f1c8e4d1288dafaa4c7e39d10a9793ce3aaea"
