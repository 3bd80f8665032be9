"""Multi-fidelity search (``--scheduler asha``): the rung rule of :mod:`controller.outcome`.

The controller learns from each trial's reward at each rung it reached, against that
rung's own baseline, plus a completed trial's final reward against the full-budget baseline.
These tests check the rung epochs against Ray's own ASHA, that rewards of different rungs
never share a baseline, that the number of updates follows the rule (also in a real Tuner
under ASHA), that a suggestion observed at several rungs is importance-weighted against the
policy that sampled it, and that without rungs everything is exactly as before.
"""

from __future__ import annotations

import sys

import pytest
import torch
from ray import cloudpickle
from test_controller import Recorder  # a controller whose observe takes no rung

import search_spaces
from controller.controllers import (
    RLController,
    deserialize_state,
    serialize_state,
)
from controller.outcome import asha_rungs
from controller.searcher import PatternSearcher
from patterns_db.states import TrialState

TINY = search_spaces.load("tiny")
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def share(tokens) -> float:
    """In [0, 1]: the share of first choices."""
    return sum(token == 0 for token in tokens) / len(tokens)


def growing_reward(tokens, epoch) -> float:
    """A reward that grows with epochs: rung e's rewards all lie in [10 e, 10 e + 1]."""
    return 10.0 * epoch + share(tokens)


class Recording(RLController):
    """Keeps (rung, reward, that rung's baseline after the update) for every observation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def observe(self, suggestion, reward, rung=None):
        super().observe(suggestion, reward, rung=rung)
        self.seen.append((rung, reward, self.baseline_of(rung)))


# -- the rungs are Ray's ---------------------------------------------------------------------
class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


@pytest.mark.parametrize(("grace", "reduction", "max_t"), [
    (1, 3, 9), (1, 3, 10), (1, 2, 8), (2, 2, 9), (1, 4, 3), (1, 1.5, 7), (1, 1.2, 6), (3, 3, 4)])
def test_rungs_are_the_epochs_where_rays_asha_compares(grace, reduction, max_t):
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(metric="reward", mode="max", max_t=max_t, grace_period=grace,
                              reduction_factor=reduction)
    (bracket,) = scheduler._brackets
    trial, compared = _Trial("t"), []
    for epoch in range(1, max_t):
        before = sum(len(recorded) for _, recorded in bracket._rungs)
        bracket.on_result(trial, epoch, 1.0)
        if sum(len(recorded) for _, recorded in bracket._rungs) > before:
            compared.append(epoch)
    assert asha_rungs(grace, reduction, max_t) == tuple(compared)
    assert asha_rungs(grace, reduction, max_t)[0] == grace


# -- the controller: one baseline per rung ---------------------------------------------------
def test_rewards_of_different_rungs_never_share_a_baseline():
    controller = Recording(TINY, seed=0)
    for _ in range(12):
        suggestion = controller.suggest()
        for rung in (1, 3):
            controller.observe(suggestion, growing_reward(suggestion.tokens, rung), rung=rung)
        controller.observe(suggestion, growing_reward(suggestion.tokens, 9))  # full budget
    for rung, reward, baseline in controller.seen:
        epoch = 9 if rung is None else rung
        assert 10 * epoch <= baseline <= 10 * epoch + 1, (rung, baseline)
        assert abs(reward - baseline) <= 1  # never an advantage of a budget difference
    assert set(controller.rung_baselines) == {1, 3}
    assert controller.updates == 36 == len(controller.seen)  # update_every=1


def test_a_batch_mixing_rungs_compares_each_reward_with_its_own_rung():
    controller = RLController(TINY, seed=0, update_every=3)
    suggestion = controller.suggest()
    controller.observe(suggestion, 10.5, rung=1)
    controller.observe(suggestion, 30.5, rung=3)
    assert controller.updates == 0 and len(controller.pending) == 2
    controller.observe(suggestion, 90.5)
    assert controller.updates == 1 and controller.pending == []
    assert (controller.rung_baselines, controller.baseline) == ({1: 10.5, 3: 30.5}, 90.5)


def test_rung_baselines_and_pending_rungs_survive_the_state_dict():
    controller = RLController(TINY, seed=2, update_every=2)
    for rung in (1, 3, None, 1, 3):
        controller.observe(controller.suggest(), 0.5 if rung is None else 0.1 * rung, rung=rung)
    restored = RLController(TINY, seed=9, update_every=2)
    restored.load_state_dict(deserialize_state(serialize_state(controller)))
    assert restored.rung_baselines == controller.rung_baselines and restored.rung_baselines
    assert restored.baseline == controller.baseline
    assert [entry[2:] for entry in restored.pending] == [(3,)]
    old = {key: value for key, value in controller.state_dict().items() if key != "rung_baselines"}
    old["pending"] = [entry[:3] for entry in old["pending"]]  # a state saved before rungs
    restored.load_state_dict(old)
    assert restored.rung_baselines == {} and len(restored.pending[0]) == 2


def test_a_suggestion_observed_again_is_weighted_against_the_policy_that_sampled_it():
    controller = RLController(TINY, seed=0, lr=0.05, entropy_weight=0.0)
    infos = []
    update = controller.update
    controller.update = lambda batch: infos.append(update(batch)) or infos[-1]
    suggestion = controller.suggest()
    controller.rung_baselines = {1: 0.0, 3: 0.0}
    controller.observe(suggestion, 1.0, rung=1)  # the policy moves towards the suggestion
    assert infos[0]["mean_ratio"] == pytest.approx(1.0, abs=1e-5)
    for _ in range(3):
        other = controller.suggest()
        controller.observe(other, 0.0, rung=2)
    with torch.no_grad():
        now = controller.policy.score(torch.tensor([suggestion.tokens]))[0].sum().item()
    controller.observe(suggestion, 1.0, rung=3)
    expected = torch.exp(torch.tensor(now - suggestion.log_prob)).item()
    assert infos[-1]["mean_ratio"] == pytest.approx(expected, rel=1e-4)
    assert abs(expected - 1.0) > 0.05, "the policy did not move; the test would prove nothing"


# -- the searcher: each rung reached, once ---------------------------------------------------
def results(epochs, tokens, final_at=None):
    return [{"training_iteration": epoch, "epoch": epoch, "reward": growing_reward(tokens, epoch),
             **({"final": True} if epoch == final_at else {})} for epoch in epochs]


def test_the_searcher_observes_each_rung_a_trial_reached_once():
    searcher = PatternSearcher(Recording(TINY, seed=0), metric="reward", mode="max",
                               rungs=asha_rungs(1, 3, 9))
    assert searcher.rungs == (1, 3)
    tokens = {trial: searcher.suggest(trial)["tokens"] for trial in "abcde"}
    # a: ASHA stops it at rung 1; Tune gives that result to on_trial_complete only
    searcher.on_trial_complete("a", results([1], tokens["a"])[-1])
    # b: continues at rung 1, stopped at rung 3
    for result in results([1, 2], tokens["b"]):
        searcher.on_trial_result("b", result)
    searcher.on_trial_complete("b", results([3], tokens["b"])[-1])
    # c: runs the whole budget; a retry reports epochs 1-2 again: observed once
    for result in results([1, 2, 1, 2, 3, 4, 5, 6, 7, 8], tokens["c"]):
        searcher.on_trial_result("c", result)
    searcher.on_trial_complete("c", results([9], tokens["c"], final_at=9)[-1])
    # d: fails after rung 1; e: stopped at an epoch that is no rung (a Tune stopper)
    searcher.on_trial_result("d", results([1], tokens["d"])[0])
    searcher.on_trial_complete("d", None, error=True)
    for result in results([1, 2], tokens["e"]):
        searcher.on_trial_result("e", result)
    searcher.on_trial_complete("e", results([2], tokens["e"])[-1])
    seen = [(rung, reward) for rung, reward, _ in searcher.controller.seen]
    assert [rung for rung, _ in seen] == [1, 1, 3, 1, 3, None, 1, 1]
    assert searcher.controller.updates == 8  # a 1, b 2, c 3, d 1, e 1
    assert seen[5] == (None, growing_reward(tokens["c"], 9))
    assert searcher.outcomes == {"a": TrialState.EARLY_STOPPED, "b": TrialState.EARLY_STOPPED,
                                 "c": TrialState.COMPLETED, "d": TrialState.FAILED,
                                 "e": TrialState.EARLY_STOPPED}
    assert searcher.observed == {} and searcher.live == {}


def test_a_rung_result_without_a_finite_reward_is_not_observed():
    searcher = PatternSearcher(Recording(TINY), metric="reward", mode="min", rungs=(1, 2))
    searcher.suggest("a")
    searcher.on_trial_result("a", {"training_iteration": 1, "score": 1.0})
    searcher.on_trial_result("a", {"training_iteration": 2, "reward": float("nan")})
    searcher.on_trial_result("a", {"training_iteration": 2, "reward": 0.25})
    assert searcher.controller.seen == [(2, -0.25, -0.25)]  # mode min: negated


def test_a_controller_without_rungs_gets_final_rewards_only():
    searcher = PatternSearcher(Recorder(TINY), metric="reward", mode="max", rungs=(1, 3))
    tokens = searcher.suggest("a")["tokens"]
    for result in results(range(1, 9), tokens):
        searcher.on_trial_result("a", result)
    searcher.on_trial_complete("a", results([9], tokens, final_at=9)[0])
    assert searcher.controller.seen == [growing_reward(tokens, 9)]


def test_rungs_and_what_was_observed_survive_a_checkpoint(tmp_path):
    searcher = PatternSearcher(RLController(TINY, seed=1), metric="reward", mode="max",
                               rungs=(1, 3))
    tokens = searcher.suggest("a")["tokens"]
    searcher.on_trial_result("a", results([1], tokens)[0])
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    restored = PatternSearcher(RLController(TINY, seed=7))
    restored.restore(str(path))
    assert restored.rungs == (1, 3) and restored.observed == {"a": {1}}
    restored.on_trial_result("a", results([1], tokens)[0])  # the resumed trial re-runs epoch 1
    assert restored.controller.updates == 1 and restored.controller.rung_baselines.keys() == {1}


# -- without rungs: exactly as before --------------------------------------------------------
def old_update(controller, batch):
    """``RLController.update`` as it was before rungs (commit 5bd9bba), for comparison."""
    from controller.controllers import clipped_importance_weights

    rewards = torch.tensor([reward for _, reward in batch])
    tokens = torch.tensor([s.tokens for s, _ in batch], dtype=torch.long)
    old_log_prob = torch.tensor([s.log_prob for s, _ in batch])
    decay = controller.settings["baseline_decay"]
    for reward in rewards.tolist():
        controller.baseline = reward if controller.baseline is None else \
            decay * controller.baseline + (1 - decay) * reward
    advantage = rewards - controller.baseline
    log_probs, entropies = controller.policy.score(tokens)
    ratio, clipped = clipped_importance_weights(log_probs.sum(1), old_log_prob,
                                                controller.settings["importance_clip"])
    surrogate = torch.minimum(ratio * advantage, clipped * advantage)
    loss = -surrogate.mean() - controller.settings["entropy_weight"] * entropies.sum(1).mean()
    controller.optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(controller.policy.parameters(), controller.settings["grad_clip"])
    controller.optimizer.step()
    controller.updates += 1


def test_without_rungs_the_searcher_learns_exactly_as_before():
    searcher = PatternSearcher(RLController(TINY, seed=3, update_every=2), metric="reward",
                               mode="max")
    reference = RLController(TINY, seed=3, update_every=2)
    pending = []
    for index in range(8):  # 5 completed: 2 updates of 2 rewards, 1 pending
        trial = f"t{index}"
        tokens = searcher.suggest(trial)["tokens"]
        suggestion = reference.suggest()
        assert list(suggestion.tokens) == tokens
        for result in results([1, 2], tokens):  # intermediate results teach nothing
            searcher.on_trial_result(trial, result)
        final = results([3], tokens, final_at=3)[0] if index % 3 else results([2], tokens)[0]
        searcher.on_trial_complete(trial, final)  # every third trial is early-stopped
        if final.get("final"):
            pending.append((suggestion, final["reward"]))
            if len(pending) == 2:
                old_update(reference, pending)
                pending = []
    controller = searcher.controller
    assert controller.updates == reference.updates == 2 and controller.rung_baselines == {}
    assert controller.baseline == reference.baseline
    for new, old in zip(controller.policy.parameters(), reference.policy.parameters()):
        assert torch.equal(new, old)
    assert [s for s, _ in controller.pending][0].tokens == pending[0][0].tokens
    assert list(searcher.outcomes.values()).count(TrialState.EARLY_STOPPED) == 3


# -- a real Tuner under ASHA -----------------------------------------------------------------
MAX_T = 4


def growing_trainable(config):
    from ray import tune

    for epoch in range(1, MAX_T + 1):
        if epoch in config["validate_at"] or epoch == MAX_T:
            tune.report({"epoch": epoch, "reward": growing_reward(config["tokens"], epoch),
                         "final": epoch == MAX_T})


@pytest.mark.ray
@pytest.mark.slow  # 10 sequential trials: about 10 s on a busy 2-core machine
@pytest.mark.parametrize("validate_at", [range(1, MAX_T), (1, 2)], ids=["every-epoch", "rungs"])
def test_under_rays_asha_updates_follow_the_rung_rule(ray_session, tmp_path, validate_at):
    """Timed by the reported ``epoch``, as the search times trials, ASHA compares trials at
    the same rungs whether a trial validates every epoch or only at the rungs (a budget's
    ``eval_every`` with the rungs added, as the trainable does)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    rungs = asha_rungs(1, 2, MAX_T)
    assert rungs == (1, 2)
    searcher = PatternSearcher(Recording(TINY, seed=0), metric="reward", mode="max",
                               rungs=rungs, time_attr="epoch")
    scheduler = ASHAScheduler(time_attr="epoch", metric="reward", mode="max", max_t=MAX_T,
                              grace_period=1, reduction_factor=2)
    grid = tune.Tuner(
        growing_trainable, param_space={"seed": 0, "validate_at": list(validate_at)},
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=1),
                                    scheduler=scheduler, num_samples=10),
        run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path), verbose=0),
    ).fit()
    assert len(grid) == 10 and not grid.errors
    reached = [result.metrics["epoch"] for result in grid]
    completed = sum(last == MAX_T for last in reached)
    assert 0 < completed < 10, "ASHA stopped no trial (or all): the test would prove nothing"
    controller = searcher.controller
    expected = sum(sum(rung <= last for rung in rungs) for last in reached) + completed
    assert controller.updates == expected == len(controller.seen)
    for rung, _, baseline in controller.seen:
        epoch = MAX_T if rung is None else rung
        assert 10 * epoch <= baseline <= 10 * epoch + 1
    counts = list(searcher.outcomes.values())
    assert counts.count(TrialState.COMPLETED) == completed
    assert counts.count(TrialState.EARLY_STOPPED) == 10 - completed
