"""max_drop: the expected dropped fraction (exact), the load checks, and sampling that obeys it."""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys

import pytest
import torch
from stats import assert_mean
from test_policy import favour_dropping

import search_spaces
from autodropout import PatternDropout
from autodropout.patterns import masks
from controller.controllers import RandomController, RLController
from search_spaces import SpaceError, bounds

CONVNET = search_spaces.load("convnet")
BASE = dict(size_h=3, size_w=5, stride=8, repeat="fill", rotate=0.0, shear_x=0.0, shear_y=0.0,
            share_c=False, residual=False)


def table_fraction(site, height, width) -> float:
    """The exact expected dropped fraction: every offset combination is equally likely, and
    :func:`masks.keep_table` holds the mask of each."""
    tiling = masks.Tiling((height, width), (site["size_h"], site["size_w"]), site["stride"],
                          site["repeat"], (site["rotate"], site["shear_x"], site["shear_y"]))
    table = masks.keep_table(tiling, torch.device("cpu"))
    return 1.0 - table.kept.double().mean().item() / (height * width)


CASES = [
    dict(BASE), dict(BASE, repeat=1), dict(BASE, repeat=2, stride=4), dict(BASE, size_h=8, stride=4),
    dict(BASE, repeat=3, rotate=45.0), dict(BASE, repeat=1, size_h=8, size_w=8, stride=32,
                                            rotate=75.0, shear_x=0.3, shear_y=-0.3),
    dict(BASE, repeat=4, stride=3, size_h=1, shear_x=-0.15), dict(BASE, repeat="fill", rotate=30.0),
]


@pytest.mark.parametrize("site", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("height, width", [(28, 28), (14, 14), (7, 7), (12, 20)])
def test_fraction_equals_the_mean_of_every_mask(site, height, width):
    assert bounds.conv_fraction(site, (height, width)) == pytest.approx(
        table_fraction(site, height, width), abs=1e-12)


def test_fraction_of_random_convnet_sites_is_exact():
    rng = random.Random(0)
    for _ in range(60):
        index = rng.randrange(3)
        site = {name: rng.choice(choices) for name, choices in CONVNET.sites[index].choices.items()}
        height, width = CONVNET.sites[index].map_size
        expected = (site["p_apply"] * site["p_tile"] * table_fraction(site, height, width))
        assert bounds.conv_fraction(site, (height, width)) == pytest.approx(expected, abs=1e-12)
        # the table the masks are built from holds the same numbers
        fields = bounds.CONV_BOUND_FIELDS
        choices = CONVNET.sites[index].choices
        where = tuple(choices[name].index(site[name]) for name in fields)
        assert bounds.site_table(CONVNET, index)[where] == pytest.approx(expected, abs=1e-12)


def test_fill_fraction_is_the_closed_form_on_any_map_and_transform():
    for size_h, size_w, stride in [(3, 5, 8), (8, 2, 4), (1, 1, 3)]:
        site = dict(BASE, size_h=size_h, size_w=size_w, stride=stride, rotate=60.0, shear_y=0.15)
        closed = min(1, size_h / stride) * min(1, size_w / stride)
        for shape in [(28, 28), (7, 9)]:
            assert bounds.conv_fraction(site, shape) == pytest.approx(closed, abs=1e-12)


@pytest.mark.parametrize("site", [
    dict(BASE, p_tile=0.1), dict(BASE, repeat=2, rotate=30.0, p_apply=0.1),
    dict(BASE, size_h=3, size_w=3, stride=3, p_tile=0.1, share_c=True),
    dict(BASE, size_h=8, stride=4, p_tile=0.5, p_apply=0.5, shear_x=0.3),
], ids=range(4))
def test_fraction_matches_drawn_masks(site):
    """Per-map dropped fractions are iid in [0, 1] with mean f: their std is <= sqrt(f(1-f))."""
    expected = bounds.conv_fraction(site, (28, 28))
    dropped = ~PatternDropout(site).keep_mask(torch.ones(256, 16, 28, 28))
    per_map = dropped.double().mean((2, 3)).flatten()
    assert_mean(per_map.mean().item(), expected, math.sqrt(expected * (1 - expected)),
                per_map.numel(), what="dropped fraction")


@pytest.mark.parametrize("axis", ["tokens", "features", "both"])
@pytest.mark.parametrize("repeat", [1, 3, "fill"])
def test_sequence_fraction_is_exact(axis, repeat):
    site = dict(size=3, stride=5, repeat=repeat, axis=axis, share=False, apply_to=["embedding"])
    tokens, features = 20, 12
    extents = {"tokens": (tokens,), "features": (features,), "both": (tokens, features)}[axis]
    tiling = masks.Tiling(extents, (3,) * len(extents), 5, repeat)
    table = masks.keep_table(tiling, torch.device("cpu"))
    exact = 1 - table.kept.double().mean().item() / math.prod(extents)
    assert bounds.sequence_fraction(site, (tokens, features)) == pytest.approx(exact, abs=1e-12)
    mask = PatternDropout(site, "sequence").keep_mask(torch.ones(64, tokens, features))
    dropped = 1 - mask.expand(64, tokens, features).double().mean().item()
    assert abs(dropped - exact) <= 6 * math.sqrt(exact * (1 - exact) / 64)


# loading --------------------------------------------------------------------------------------

SMALL = """\
name: small
kind: conv
max_drop: 0.3
map_size: 14
sites:
  - {name: a}
  - {name: b, map_size: [7, 9]}
decisions:
  size_h: [1, 4, 8]
  size_w: [2, 8]
  stride: [4, 8]
  repeat: [1, fill]
  rotate: [0, 45]
  shear_x: [0.0]
  shear_y: [0.0]
  share_c: [true, false]
  residual: [false]
"""


def test_space_keys_and_defaults(tmp_path):
    space = search_spaces.parse(SMALL)
    assert space.max_drop == 0.3 and space.map_size == (14, 14)
    assert [bounds.site_map(space, i) for i in range(2)] == [(14, 14), (7, 9)]
    assert space.sites[0].choices["p_apply"] == (1.0,)  # optional fields default to one choice
    unbounded = search_spaces.load("tiny")
    assert unbounded.max_drop is None and unbounded.choice_masks is None
    assert bounds.site_map(unbounded, 0) == bounds.DEFAULT_CONV_MAP
    assert bounds.site_map(search_spaces.load("transformer"), 0) == (64, 128)


@pytest.mark.parametrize("text, message", [
    (SMALL.replace("max_drop: 0.3", "max_drop: 0"), ":3: max_drop: must be a finite number in (0, 1]"),
    (SMALL.replace("max_drop: 0.3", "max_drop: 1.5"), ":3: max_drop: must be a finite number in (0, 1]"),
    (SMALL.replace("max_drop: 0.3", "max_drop: lots"), ":3: max_drop: must be a finite number"),
    (SMALL.replace("max_drop: 0.3", "max_drop: 0.001").replace("[1, 4, 8]", "[8]"),
     ":3: max_drop: site 'a' has no pattern dropping at most 0.001"),
    (SMALL.replace("map_size: 14", "map_size: [14]"), ":4: map_size: must be a positive integer"),
    (SMALL.replace("[7, 9]", "[7, 0]"), ":7: sites[1].map_size: must be a positive integer"),
    (SMALL.replace("  residual: [false]", "  residual: [false]\n  p_tile: [0.0]"),
     ":18: decisions.p_tile: must be a finite number in (0, 1]"),
])
def test_bad_bounds_name_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as error:
        search_spaces.load(path)
    assert str(error.value).startswith(f"{path}:") and message in str(error.value), str(error.value)


def test_cli_refuses_a_bad_bound_with_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SMALL.replace("max_drop: 0.3", "max_drop: 2"))
    done = subprocess.run([sys.executable, "-m", "autodropout", "spaces", "show", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"autodropout: error: {path}:3: max_drop:")


# sampling ------------------------------------------------------------------------------------


def every_sequence(space):
    return itertools.product(*(range(len(d.choices)) for d in space.decisions))


def test_masks_allow_exactly_the_prefixes_with_a_completion_in_the_bound():
    space = search_spaces.parse(SMALL)
    masks_ = space.choice_masks
    inside = {tokens for tokens in every_sequence(space) if space.within_bound(space.decode(tokens))}
    assert 0 < len(inside) < math.prod(len(d.choices) for d in space.decisions)
    prefixes = {tokens[:k] for tokens in inside for k in range(len(tokens) + 1)}
    for tokens in every_sequence(space):
        for step in range(len(tokens)):
            allowed = masks_.allowed(step, tokens[:step])
            if tokens[:step] in prefixes:  # reachable: a choice is allowed iff it can complete
                expected = [tokens[:step] + (c,) in prefixes for c in range(len(allowed or [0]))]
                assert (allowed or [True] * len(expected)) == expected


def test_random_search_is_uniform_over_the_patterns_in_the_bound():
    space = search_spaces.parse(SMALL)
    inside = [tokens for tokens in every_sequence(space) if space.within_bound(space.decode(tokens))]
    controller = RandomController(space, seed=1)
    seen = {}
    for _ in range(400):
        suggestion = controller.suggest()
        assert space.within_bound(suggestion.pattern)
        assert suggestion.log_prob == pytest.approx(-math.log(len(inside)), abs=1e-9)
        seen[suggestion.tokens] = seen.get(suggestion.tokens, 0) + 1
    assert set(seen) <= set(inside)


@pytest.mark.parametrize("architecture", ["transformer", "lstm"])
def test_policy_never_samples_outside_the_bound_and_its_mass_is_the_bounded_set(architecture):
    space = search_spaces.parse(SMALL)
    controller = RLController(space, seed=0, architecture=architecture, hidden_size=16, heads=2)
    with torch.no_grad():
        for parameter in controller.policy.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    tokens = torch.tensor(list(every_sequence(space)))
    with torch.no_grad():
        log_probs, _ = controller.policy.score(tokens, allowed=space.choice_masks)
    inside = torch.tensor([space.within_bound(space.decode(t.tolist())) for t in tokens])
    probability = log_probs.sum(1).exp()
    assert probability[~inside].max() == 0  # exactly: masked to -inf
    assert probability[inside].sum().item() == pytest.approx(1.0, abs=1e-5)
    for _ in range(200):
        assert space.within_bound(controller.suggest().pattern)


def test_convnet_suggestions_stay_within_the_bound_and_the_ratio_is_one():
    controller = RLController(CONVNET, seed=3)
    favour_dropping(controller.policy, CONVNET)
    suggestions = [controller.suggest() for _ in range(300)]
    assert all(CONVNET.within_bound(s.pattern) for s in suggestions)
    unmasked = controller.policy.sample(300, generator=torch.Generator().manual_seed(0))[0]
    outside = sum(not CONVNET.within_bound(CONVNET.decode(t.tolist())) for t in unmasked)
    assert outside > 0  # the bound does bind for this policy
    stats = controller.update([(s, 0.5 + 0.001 * i) for i, s in enumerate(suggestions[:8])])
    assert stats["mean_ratio"] == pytest.approx(1.0, abs=1e-5)
