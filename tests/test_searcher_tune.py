"""``PatternSearcher`` inside a real ``tune.Tuner``, as users plug it into their own: under
``Repeater``, with an empty ``param_space`` and with Tune search-space definitions in it.

The trainables report a synthetic reward at once (no training), so each Tuner runs in seconds.
"""

from __future__ import annotations

import math
import sys

import pytest
from ray import cloudpickle, tune
from ray.tune.search import ConcurrencyLimiter, Repeater
from ray.tune.search.repeater import TRIAL_INDEX

import search_spaces
from controller.controllers import RLController
from controller.searcher import PatternSearcher
from patterns_db.states import TrialState

TINY = search_spaces.load("tiny")

pytestmark = pytest.mark.ray

# Ray's workers cannot import this test module: ship its trainables by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def token_reward(config):
    """The share of first choices among the tokens, plus 0.1 per repeat index (Repeater)."""
    tokens = config["tokens"]
    base = sum(token == 0 for token in tokens) / len(tokens)
    tune.report({"reward": base + 0.1 * config.get(TRIAL_INDEX, 0), "final": True})


def score_trainable(config):
    """Reports ``score`` only: a searcher looking for ``reward`` would learn nothing."""
    tune.report({"score": 1.0, "final": True})


def echo_trainable(config):
    tune.report({"reward": 0.5, "final": True, "lr_is_number": isinstance(config["lr"], float)})


class RecordingController(RLController):
    """An RL controller that also keeps every reward it observed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def observe(self, suggestion, reward):
        self.seen.append((suggestion.tokens, reward))
        super().observe(suggestion, reward)


def fit(trainable, searcher, tmp_path, num_samples, param_space=None, **tune_config):
    tuner = tune.Tuner(
        trainable,
        param_space=param_space if param_space is not None else {},
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=num_samples, **tune_config),
        run_config=tune.RunConfig(name="t", storage_path=str(tmp_path), verbose=0),
    )
    return tuner.fit()


@pytest.mark.slow  # 6 trials: about 10 s on a busy 2-core machine
def test_the_controller_learns_under_repeater(ray_session, tmp_path):
    searcher = PatternSearcher(RecordingController(TINY, seed=0), metric="reward", mode="max")
    grid = fit(token_reward, Repeater(searcher, repeat=2), tmp_path, num_samples=6)
    assert len(grid) == 6 and not grid.errors
    controller = searcher.controller
    # one update per group of 2 repeats (update_every=1), from Repeater's mean reward
    assert controller.updates == 3 and len(controller.seen) == 3
    for tokens, reward in controller.seen:
        base = sum(token == 0 for token in tokens) / len(tokens)
        assert reward == pytest.approx(base + 0.05)  # repeat indices 0 and 1: mean 0.5
    assert list(searcher.outcomes.values()) == [TrialState.COMPLETED] * 3


def test_repeater_under_a_concurrency_limiter_minimising(ray_session, tmp_path):
    searcher = PatternSearcher(RecordingController(TINY, seed=1), metric="reward", mode="min")
    limited = ConcurrencyLimiter(Repeater(searcher, repeat=2), max_concurrent=2)
    fit(token_reward, limited, tmp_path, num_samples=4)
    assert searcher.controller.updates == 2
    assert all(reward < 0 for _, reward in searcher.controller.seen)  # min: negated


def test_an_empty_param_space_without_metric_and_mode_raises(ray_session, tmp_path):
    searcher = PatternSearcher(RLController(TINY))
    with pytest.raises(Exception, match=r"metric.*\(None\) or `mode` \(None\)"):
        fit(token_reward, searcher, tmp_path, num_samples=2, metric="reward", mode="max")
    assert searcher.controller.updates == 0 and not searcher.outcomes


def test_metric_and_mode_come_from_tune_config_with_a_param_space(ray_session, tmp_path):
    searcher = PatternSearcher(RLController(TINY))
    fit(score_trainable, searcher, tmp_path, num_samples=2, param_space={"seed": 0},
        metric="score", mode="max")
    assert (searcher.metric, searcher.mode) == ("score", "max")
    assert searcher.controller.updates == 2


@pytest.mark.parametrize(("param_space", "named"), [
    ({"lr": tune.uniform(0.01, 0.1)}, r"param_space\['lr'\] is a search-space definition \(Float\)"),
    ({"budget": {"lr": tune.choice([0.1, 0.2])}},
     r"param_space\['budget'\]\['lr'\] is a search-space definition \(Categorical\)"),
    ({"lr": tune.grid_search([0.1, 0.2])}, r"param_space\['lr'\] is a search-space definition"),
    ({"pattern": "{}"}, r"param_space\['pattern'\] is set by the searcher"),
])
def test_search_space_definitions_in_param_space_are_refused(ray_session, tmp_path,
                                                              param_space, named):
    searcher = PatternSearcher(RLController(TINY), metric="reward", mode="max")
    with pytest.raises(ValueError, match=named):
        fit(echo_trainable, searcher, tmp_path, num_samples=1, param_space=param_space)
    assert not searcher.live


def test_fixed_values_in_param_space_reach_the_trainable(ray_session, tmp_path):
    searcher = PatternSearcher(RLController(TINY), metric="reward", mode="max")
    grid = fit(echo_trainable, searcher, tmp_path, num_samples=1, param_space={"lr": 0.05})
    (result,) = grid
    assert result.metrics["lr_is_number"] and result.config["lr"] == 0.05
    assert math.isclose(result.metrics["reward"], 0.5) and searcher.controller.updates == 1
