"""CurriculumDropout's schedules and step buffer; DropoutScheduler's curriculum, early, late."""

from __future__ import annotations

import math

import pytest
import torch
from stats import assert_fraction
from torch import nn

from autodropout import CurriculumDropout, DropoutScheduler, KeepMaskDropout, mc_dropout

P = 0.6
T = 10


def expected_rate(schedule: str, t: int, p: float = P, total: int = T) -> float:
    """The paper's / documented closed forms, in float64."""
    if schedule == "exponential":
        gamma = math.log(100.0) / total
        return p * (1.0 - math.exp(-gamma * t))  # = 1 - theta(t), theta_bar = 1 - p
    progress = min(t / total, 1.0)
    if schedule == "linear":
        return p * progress
    return p * (1.0 - math.cos(math.pi * progress)) / 2.0


def at_step(layer: CurriculumDropout, step: int) -> CurriculumDropout:
    layer.step.fill_(step)
    return layer


@pytest.mark.parametrize(
    ("schedule", "t", "rate"),
    [
        ("exponential", 0, 0.0),
        ("exponential", T // 2, P * 0.9),  # exp(-ln(100) / 2) = 0.1
        ("exponential", T, P * 0.99),  # the documented 99 % at total_steps
        ("linear", 0, 0.0),
        ("linear", T // 2, P / 2),
        ("linear", T, P),
        ("cosine", 0, 0.0),
        ("cosine", T // 2, P / 2),
        ("cosine", T, P),
    ],
)
def test_schedule_values_at_start_middle_end(schedule, t, rate):
    layer = at_step(CurriculumDropout(P, total_steps=T, schedule=schedule), t)
    assert layer.current_p == pytest.approx(rate, abs=1e-6)
    assert rate == pytest.approx(expected_rate(schedule, t), abs=1e-12)


@pytest.mark.parametrize("schedule", ["exponential", "linear", "cosine"])
def test_schedule_follows_formula_every_step_and_is_monotone(schedule):
    layer = CurriculumDropout(P, total_steps=T, schedule=schedule)
    rates = [at_step(layer, t).current_p for t in range(2 * T)]
    assert rates == pytest.approx([expected_rate(schedule, t) for t in range(2 * T)], abs=1e-6)
    assert all(a <= b for a, b in zip(rates, rates[1:]))
    assert max(rates) <= P + 1e-6  # the rate is computed in float32


def test_exponential_matches_keep_probability_of_the_paper_with_custom_gamma():
    layer = at_step(CurriculumDropout(0.3, total_steps=100, gamma=0.05), 7)
    theta_bar = 1.0 - 0.3
    theta = (1.0 - theta_bar) * math.exp(-0.05 * 7) + theta_bar
    assert 1.0 - layer.current_p == pytest.approx(theta, abs=1e-6)
    assert "gamma=0.05" in repr(layer)


def test_step_advances_on_training_forward_only():
    layer = CurriculumDropout(P, total_steps=T)
    x = torch.randn(3, 4)
    for _ in range(3):
        layer(x)
    assert int(layer.step) == 3
    layer.eval()
    assert layer(x) is x
    assert int(layer.step) == 3


def test_state_dict_round_trip_restores_the_step():
    layer = CurriculumDropout(P, total_steps=T, schedule="linear")
    for _ in range(4):
        layer(torch.randn(2, 3))
    state = layer.state_dict()
    assert int(state["step"]) == 4
    restored = CurriculumDropout(P, total_steps=T, schedule="linear")
    restored.load_state_dict(state)
    assert int(restored.step) == 4
    assert restored.current_p == layer.current_p == pytest.approx(0.4 * P, abs=1e-6)


def test_eval_is_identity_at_any_step():
    layer = at_step(CurriculumDropout(P, total_steps=T, schedule="linear"), T).eval()
    x = torch.randn(4, 5)
    assert torch.equal(layer(x), x)


@pytest.mark.parametrize("schedule", ["exponential", "linear", "cosine"])
def test_realised_drop_fraction_matches_current_p(schedule):
    layer = at_step(CurriculumDropout(P, total_steps=T, schedule=schedule), 3)
    rate = layer.current_p
    n = 40_000
    y = layer(torch.ones(n))
    dropped = y == 0
    assert_fraction(dropped.float().mean().item(), n, rate, what="dropped fraction")
    assert torch.allclose(y[~dropped], torch.full_like(y[~dropped], 1.0 / (1.0 - rate)))


def test_first_training_forward_keeps_everything_and_full_rate_drops_everything():
    x = torch.randn(50)
    assert torch.equal(CurriculumDropout(P, total_steps=T)(x), x)  # rate 0 at step 0
    y = at_step(CurriculumDropout(1.0, total_steps=T, schedule="linear"), T)(x)
    assert torch.equal(y, torch.zeros_like(x))  # keep probability 0: no 0 / 0


def test_rate_is_a_tensor_and_compiles_once():
    compiles = 0

    def counting_backend(graph, example_inputs):
        nonlocal compiles
        compiles += 1
        return graph.forward

    torch._dynamo.reset()
    layer = CurriculumDropout(P, total_steps=4, schedule="linear")
    compiled = torch.compile(layer, backend=counting_backend)
    assert isinstance(layer.drop_rate(), torch.Tensor)
    fractions = [(compiled(torch.ones(2000)) == 0).float().mean().item() for _ in range(5)]
    assert compiles == 1
    assert int(layer.step) == 5
    assert fractions[0] == 0.0 and fractions[-1] > 0.3


def test_step_does_not_advance_under_mc_dropout():
    layer = at_step(CurriculumDropout(P, total_steps=T, schedule="linear"), T)
    x = torch.ones(200)
    with mc_dropout(layer):
        assert not torch.equal(layer(x), layer(x))
    assert int(layer.step) == T
    layer.train()
    layer(x)
    assert int(layer.step) == T + 1


def test_bf16_input_keeps_dtype():
    layer = at_step(CurriculumDropout(0.5, total_steps=T, schedule="linear"), T)
    y = layer(torch.ones(1000, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert set(y.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"p": 1.5, "total_steps": T}, "p"),
        ({"p": P, "total_steps": 0}, "total_steps"),
        ({"p": P, "total_steps": 2.5}, "total_steps"),
        ({"p": P, "total_steps": T, "schedule": "step"}, "schedule"),
        ({"p": P, "total_steps": T, "gamma": -1.0}, "gamma"),
        ({"p": P, "total_steps": T, "schedule": "linear", "gamma": 0.1}, "gamma"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        CurriculumDropout(**kwargs)


class CountingDropout(KeepMaskDropout):
    """A fixed-rate family layer that counts writes of its drop probability ``p``."""

    def __setattr__(self, name, value):
        if name == "p":
            vars(self)["writes"] = vars(self).get("writes", 0) + 1
        super().__setattr__(name, value)

    def scaled_keep_mask(self, x):
        return torch.ones_like(x)


def make_model(first: float = 0.4, second: float = 0.2) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(3, 3),
        nn.Dropout(first),
        CountingDropout(second),
        CurriculumDropout(0.5, total_steps=T),
        nn.ReLU(),
    )


def run(scheduler: DropoutScheduler, steps: int) -> list[dict[str, float]]:
    history = [scheduler.rates()]
    for _ in range(steps):
        scheduler.step()
        history.append(scheduler.rates())
    return history


def test_scheduler_drives_family_and_torch_layers_but_not_curriculum_dropout():
    model = make_model()
    scheduler = DropoutScheduler(model, schedule="linear", total_steps=T)
    assert set(scheduler.layers) == {"1", "2"}
    assert scheduler.targets == {"1": 0.4, "2": 0.2}
    assert model[3].p == 0.5


@pytest.mark.parametrize("schedule", ["exponential", "linear", "cosine"])
def test_curriculum_scheduler_ramps_each_layer_to_its_own_target(schedule):
    model = make_model()
    history = run(DropoutScheduler(model, schedule=schedule, total_steps=T), T + 2)
    for t, rates in enumerate(history):
        assert rates["1"] == pytest.approx(expected_rate(schedule, t, p=0.4), abs=1e-12)
        assert rates["2"] == pytest.approx(expected_rate(schedule, t, p=0.2), abs=1e-12)


def test_target_p_overrides_every_layer():
    model = make_model()
    history = run(DropoutScheduler(model, schedule="linear", total_steps=4, target_p=0.8), 4)
    assert [rates["1"] for rates in history] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert history[-1]["2"] == pytest.approx(0.8)


def test_early_dropout_is_on_for_switch_step_steps_then_off():
    model = make_model()
    history = run(DropoutScheduler(model, kind="early", switch_step=3), 5)
    assert [rates["1"] for rates in history] == [0.4, 0.4, 0.4, 0.0, 0.0, 0.0]
    assert [rates["2"] for rates in history] == [0.2, 0.2, 0.2, 0.0, 0.0, 0.0]


def test_late_dropout_is_off_until_switch_step_then_on():
    model = make_model()
    history = run(DropoutScheduler(model, kind="late", switch_step=2), 4)
    assert [rates["1"] for rates in history] == [0.0, 0.0, 0.4, 0.4, 0.4]
    assert [rates["2"] for rates in history] == [0.0, 0.0, 0.2, 0.2, 0.2]


def test_scheduler_writes_p_only_when_it_changes():
    model = make_model()
    writes_at_construction = model[2].writes  # the layer's own __init__
    run(DropoutScheduler(model, kind="early", switch_step=3), 8)
    assert model[2].writes == writes_at_construction + 1


def test_levels_bound_the_number_of_distinct_rates():
    model = make_model()
    history = run(DropoutScheduler(model, schedule="cosine", total_steps=40, levels=4), 45)
    values = sorted({rates["1"] for rates in history})
    assert values == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert history[-1]["1"] == pytest.approx(0.4)


def test_scheduler_state_dict_round_trip_continues_identically():
    original = make_model()
    scheduler = DropoutScheduler(original, schedule="cosine", total_steps=T)
    run(scheduler, 4)
    state = scheduler.state_dict()

    model = make_model(first=0.9, second=0.9)  # different initial rates: the state wins
    restored = DropoutScheduler(model, schedule="cosine", total_steps=T)
    restored.load_state_dict(state)
    assert restored.last_step == 4
    assert restored.targets == {"1": 0.4, "2": 0.2}
    assert restored.rates() == scheduler.rates()
    assert run(restored, 3) == run(scheduler, 3)


def test_scheduler_state_dict_rejects_another_model():
    state = DropoutScheduler(make_model(), kind="late", switch_step=2).state_dict()
    other = DropoutScheduler(nn.Sequential(nn.Dropout(0.1)), kind="late", switch_step=2)
    with pytest.raises(ValueError, match="targets"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"kind": "middle", "switch_step": 2}, "kind"),
        ({"kind": "curriculum"}, "total_steps"),
        ({"kind": "early"}, "switch_step"),
        ({"kind": "late", "switch_step": 0}, "switch_step"),
        ({"total_steps": T, "target_p": 1.2}, "target_p"),
        ({"total_steps": T, "schedule": "step"}, "schedule"),
        ({"total_steps": T, "levels": 0}, "levels"),
    ],
)
def test_scheduler_bad_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DropoutScheduler(make_model(), **kwargs)


def test_scheduled_rates_change_the_realised_drop_fraction():
    model = nn.Sequential(nn.Dropout(0.5))
    scheduler = DropoutScheduler(model, kind="late", switch_step=1)
    x = torch.ones(20_000)
    assert torch.equal(model(x), x)
    scheduler.step()
    assert_fraction((model(x) == 0).float().mean().item(), x.numel(), 0.5)
