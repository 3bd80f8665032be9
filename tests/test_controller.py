"""The controller on its own, without Ray: policy, REINFORCE update, searcher rules."""

import math
import pickle

import numpy as np
import pytest
import torch
from scipy import stats

import search_spaces
from controller.controllers import (
    RandomController,
    RLController,
    clipped_importance_weights,
    deserialize_state,
    serialize_state,
)
from controller.outcome import trial_outcome
from controller.policy import PatternPolicy
from controller.searcher import PatternSearcher
from patterns_db.states import TrialState

CONVNET = search_spaces.load("convnet")
TINY = search_spaces.load("tiny")


def hidden_target(space, seed):
    generator = torch.Generator().manual_seed(1000 + seed)
    return [int(torch.randint(len(d.choices), (1,), generator=generator)) for d in space.decisions]


def synthetic_reward(tokens, target):
    return sum(t == g for t, g in zip(tokens, target)) / len(target)


def run(controller, target, samples=200):
    rewards = []
    for _ in range(samples):
        suggestion = controller.suggest()
        rewards.append(synthetic_reward(suggestion.tokens, target))
        controller.observe(suggestion, rewards[-1])
    return rewards


@pytest.mark.slow
def test_reinforce_beats_random_within_200_samples():
    for seed in range(3):
        target = hidden_target(CONVNET, seed)
        rl = run(RLController(CONVNET, seed=seed), target)
        random = run(RandomController(CONVNET, seed=seed), target)
        rl_late, random_late = sum(rl[-50:]) / 50, sum(random[-50:]) / 50
        # Random's per-sample reward has mean ~0.25 and sd ~0.08 (a sum of 27 Bernoullis /27),
        # so its 50-sample mean has sd ~0.012: a margin of 0.15 is over 10 sd.
        assert rl_late > random_late + 0.15, (seed, rl_late, random_late)


@pytest.mark.parametrize("architecture", ["transformer", "lstm"])
def test_policy_scores_what_it_samples(architecture):
    policy = PatternPolicy([len(d.choices) for d in CONVNET.decisions], architecture=architecture)
    tokens, log_probs = policy.sample(8, generator=torch.Generator().manual_seed(0))
    scored, entropy = policy.score(tokens)
    assert torch.allclose(scored, log_probs, atol=1e-5)
    assert (entropy > 0).all() and tokens.shape == (8, len(CONVNET.decisions))
    for step, decision in enumerate(CONVNET.decisions):
        assert tokens[:, step].min() >= 0 and tokens[:, step].max() < len(decision.choices)


def test_importance_weights_are_right_for_stale_samples():
    controller = RLController(TINY, seed=0, lr=0.05)
    stale = controller.suggest()
    fresh_ratio, _ = clipped_importance_weights(
        controller.policy.score(torch.tensor([stale.tokens]))[0].sum(1), torch.tensor([stale.log_prob]), 0.2)
    assert fresh_ratio.item() == pytest.approx(1.0, abs=1e-5)
    for _ in range(6):  # the policy moves on while the stale trial is still running
        other = controller.suggest()
        controller.observe(other, synthetic_reward(other.tokens, [0] * 5))
    with torch.no_grad():
        new_log_prob = controller.policy.score(torch.tensor([stale.tokens]))[0].sum(1)
    ratio, clipped = clipped_importance_weights(new_log_prob, torch.tensor([stale.log_prob]), 0.2)
    expected = math.exp(new_log_prob.item() - stale.log_prob)
    assert ratio.item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - 1.0) > 0.05, "the policy did not move; the test would prove nothing"
    assert clipped.item() == pytest.approx(min(max(expected, 0.8), 1.2), rel=1e-6)


def test_update_uses_importance_weighted_clipped_surrogate():
    controller = RLController(TINY, seed=0, lr=0.05, entropy_weight=0.0)
    suggestion = controller.suggest()
    # Pretend the sample was drawn when the policy gave it 10x less probability: ratio 10 is
    # clipped to 1.2, and with a positive advantage the clipped branch has zero gradient.
    stale = type(suggestion)(suggestion.pattern, suggestion.tokens,
                             tuple(lp - math.log(10) / 5 for lp in suggestion.log_probs))
    controller.baseline = 0.0
    info = controller.update([(stale, 1.0)])
    assert info["mean_ratio"] == pytest.approx(10.0, rel=1e-4)
    assert info["grad_norm"] == 0.0


def test_random_controller_is_uniform():
    controller = RandomController(TINY, seed=3)
    counts = torch.zeros(len(TINY.decisions), 2)
    for _ in range(2000):
        for step, token in enumerate(controller.suggest().tokens):
            counts[step, token] += 1
    for row in counts:
        assert stats.chisquare(row.numpy()).pvalue > 1e-6


def test_controller_state_round_trips():
    controller = RLController(CONVNET, seed=5)
    for reward in (0.3, 0.6, 0.9):
        controller.observe(controller.suggest(), reward)
    restored = RLController(CONVNET, seed=99)
    restored.load_state_dict(deserialize_state(serialize_state(controller)))
    assert restored.baseline == controller.baseline and restored.updates == 3
    assert restored.suggest() == controller.suggest()


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown controller setting 'learning_rate'"):
        RLController(TINY, learning_rate=0.1)


class Recorder(RandomController):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def observe(self, suggestion, reward):
        self.seen.append(reward)


def test_searcher_reward_rules():
    searcher = PatternSearcher(Recorder(TINY), metric="reward", mode="max")
    configs = {trial: searcher.suggest(trial) for trial in "abcde"}
    assert set(configs["a"]) == {"pattern", "tokens"}
    searcher.on_trial_complete("a", {"reward": 0.7, "final": True})
    searcher.on_trial_complete("b", None, error=True)
    searcher.on_trial_complete("c", {"reward": 0.4, "final": False})  # stopped early by ASHA
    searcher.on_trial_complete("d", {"reward": 0.0, "final": True, "diverged": True})
    searcher.on_trial_complete("d", {"reward": 0.0, "final": True})  # reported twice: once
    assert searcher.controller.seen == [0.7, 0.0]
    assert searcher.outcomes == {"a": TrialState.COMPLETED, "b": TrialState.FAILED,
                                 "c": TrialState.EARLY_STOPPED, "d": TrialState.COMPLETED}
    assert searcher.outcomes["c"] == "early-stopped"  # the stored string
    minimising = PatternSearcher(Recorder(TINY), metric="val_loss", mode="min")
    minimising.suggest("x")
    minimising.on_trial_complete("x", {"val_loss": 2.5, "final": True})
    assert minimising.controller.seen == [-2.5]


def test_searcher_survives_pickle_and_checkpoint(tmp_path):
    searcher = PatternSearcher(RLController(TINY, seed=1), metric="reward", mode="max")
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"reward": 0.5, "final": True})
    searcher.suggest("t2")  # still running at checkpoint time
    clone = pickle.loads(pickle.dumps(searcher))
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    restored = PatternSearcher(RLController(TINY, seed=7))
    restored.restore(str(path))
    expected = searcher.suggest("t3")
    for other in (clone, restored):
        assert set(other.live) == {"t2"} and other.controller.updates == 1
        assert other.suggest("t3") == expected


@pytest.mark.parametrize(("result", "error", "metric", "expected"), [
    ({"reward": 0.7, "final": True}, False, "reward", TrialState.COMPLETED),
    ({"reward": 0.0, "final": True, "diverged": True}, False, "reward", TrialState.COMPLETED),
    ({"reward": 0.4, "final": False}, False, "reward", TrialState.EARLY_STOPPED),
    ({"reward": 0.4, "training_iteration": 2}, False, "reward", TrialState.EARLY_STOPPED),
    ({"reward": 0.7, "final": True}, True, "reward", TrialState.FAILED),
    (None, True, "reward", TrialState.FAILED),
    ({}, False, "reward", TrialState.FAILED),
    ({"final": True}, False, "reward", TrialState.FAILED),  # final, but no reward to learn from
    ({"val_loss": 2.5, "final": True}, False, "val_loss", TrialState.COMPLETED),
    # group summaries: Repeater's {metric: nanmean over the repeats}, no Tune keys, no final
    ({"reward": 0.4}, False, "reward", TrialState.COMPLETED),
    ({"reward": np.float64(0.4)}, True, "reward", TrialState.COMPLETED),  # the last repeat failed
    ({"reward": np.nan}, False, "reward", TrialState.FAILED),  # no repeat reported a reward
    ({"reward": np.nan}, True, "reward", TrialState.FAILED),
    ({"val_loss": 2.5}, False, "reward", TrialState.FAILED),
])
def test_trial_outcome_rules(result, error, metric, expected):
    assert trial_outcome(result, error, metric) is expected


def test_searcher_needs_a_metric_and_a_mode_like_rays_searchers():
    searcher = PatternSearcher(Recorder(TINY))
    with pytest.raises(RuntimeError, match=r"`metric` \(None\) or `mode` \(None\)"):
        searcher.suggest("a")
    searcher.set_search_properties("val_loss", "min", {"seed": 0})
    assert (searcher.metric, searcher.mode) == ("val_loss", "min")
    searcher.suggest("a")
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        searcher.set_search_properties("reward", "maximise", {"seed": 0})


def test_searcher_warns_of_a_trial_without_its_metric(caplog):
    searcher = PatternSearcher(Recorder(TINY), metric="reward", mode="max")
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"score": 1.0, "final": True, "training_iteration": 1})
    assert searcher.outcomes["a"] is TrialState.FAILED and searcher.controller.seen == []
    assert "trial a ended without the metric 'reward'" in caplog.text
    assert "final, score, training_iteration" in caplog.text


class FakeStore:
    def __init__(self):
        self.trials = []

    def record_trial(self, search, trial_id, pattern, **fields):
        self.trials.append((trial_id, fields))

    def save_controller_state(self, search, blob):
        pass


class FakeTrial:
    def __init__(self, trial_id, config, result):
        self.trial_id, self.config, self.last_result = trial_id, config, result


@pytest.mark.parametrize("result", [
    {"reward": 0.7, "final": True}, {"reward": 0.4, "final": False}, {"final": True}])
def test_the_store_records_the_outcome_the_searcher_learns_by(result):
    from controller.callbacks import StoreCallback

    searcher = PatternSearcher(Recorder(TINY), metric="reward", mode="max")
    trial = FakeTrial("t", searcher.suggest("t"), result)
    callback = StoreCallback(None, "search", searcher)
    callback._store = FakeStore()
    callback.on_trial_complete(0, [trial], trial)
    searcher.on_trial_complete("t", result)
    ((_, fields),) = callback._store.trials
    assert fields["status"] is searcher.outcomes["t"] is trial_outcome(result)
    learned = searcher.outcomes["t"] is TrialState.COMPLETED
    assert searcher.controller.seen == ([result["reward"]] if learned else [])
    assert (fields["reward"] is None) == (fields["status"] is TrialState.FAILED)
