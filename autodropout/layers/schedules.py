"""Drop rates that change during training: curriculum, early and late dropout."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from autodropout.validation import check_choice, check_int, check_probability, check_real, is_real

from .base import DropoutLayer, KeepMaskDropout

SCHEDULES = ("exponential", "linear", "cosine")
KINDS = ("curriculum", "early", "late")

# exp(-gamma * total_steps) = 1 / 100: the default exponential ramp is 99 % done at total_steps.
DEFAULT_RAMP_COMPLETION = 0.99


def resolve_gamma(schedule: str, gamma: float | None, total_steps: int) -> float | None:
    """The exponential decay rate; ``None`` for the other schedules."""
    check_choice(schedule, SCHEDULES, "schedule")
    if schedule != "exponential":
        if gamma is not None:
            raise ValueError(f"gamma only applies to the exponential schedule, got {schedule!r}")
        return None
    if gamma is None:
        return -math.log(1.0 - DEFAULT_RAMP_COMPLETION) / total_steps
    return check_real(gamma, "gamma", low=0, low_open=True)


def ramp(schedule: str, step: Tensor, total_steps: int, gamma: float | None) -> Tensor:
    """Fraction of the target drop rate reached after ``step`` steps, in [0, 1].

    exponential: ``1 - exp(-gamma * t)`` (never quite 1); linear: ``min(t / T, 1)``;
    cosine: ``(1 - cos(pi * min(t / T, 1))) / 2``.
    """
    if schedule == "exponential":
        return 1.0 - torch.exp(-gamma * step)
    progress = (step / total_steps).clamp(max=1.0)
    if schedule == "linear":
        return progress
    return (1.0 - torch.cos(math.pi * progress)) / 2.0


class CurriculumDropout(KeepMaskDropout):
    """Curriculum dropout (Morerio et al., 2017): the drop rate grows from 0 to ``p``.

    The keep probability at training step ``t`` follows the paper's schedule
    ``theta(t) = (1 - theta_bar) * exp(-gamma * t) + theta_bar`` with ``theta_bar = 1 - p``,
    i.e. a drop probability ``p(t) = p * (1 - exp(-gamma * t))``. ``p`` is the target drop
    probability. The default ``gamma = ln(100) / total_steps`` makes the rate reach 99 % of
    ``p`` at ``total_steps`` (it keeps approaching ``p`` afterwards). ``schedule="linear"``
    uses ``p(t) = p * min(t / T, 1)`` and ``"cosine"`` ``p(t) = p * (1 - cos(pi min(t/T, 1))) / 2``,
    both reaching ``p`` exactly at ``T = total_steps``.

    Each element is kept with probability ``1 - p(t)`` and rescaled by ``1 / (1 - p(t))``;
    identity at eval. The step counter ``step`` is a buffer (saved in the state dict) that
    advances by one on every training forward, except while :func:`autodropout.mc_dropout`
    samples. The rate is computed on the buffer's device, so a forward never syncs with the
    host and a compiled forward is not recompiled as the rate changes.
    """

    step: Tensor

    def __init__(
        self,
        p: float,
        total_steps: int,
        schedule: str = "exponential",
        gamma: float | None = None,
    ) -> None:
        super().__init__(p)
        self.total_steps = check_int(total_steps, "total_steps", low=1)
        self.gamma = resolve_gamma(schedule, gamma, self.total_steps)
        self.schedule = schedule
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def drop_rate(self) -> Tensor:
        """The drop probability at the current step, as a 0-d tensor (no host sync)."""
        return self.p * ramp(self.schedule, self.step, self.total_steps, self.gamma)

    @property
    def current_p(self) -> float:
        """The current drop probability as a Python float (syncs; for logging)."""
        return float(self.drop_rate())

    def forward(self, x: Tensor) -> Tensor:
        output = super().forward(x)
        if self.updates_state:
            self.step.add_(1)
        return output

    def scaled_keep_mask(self, x: Tensor) -> Tensor:
        keep_prob = 1.0 - self.drop_rate()
        keep = torch.empty_like(x).bernoulli_(keep_prob)
        # keep is all zeros where keep_prob == 0; the clamp only avoids 0 / 0.
        return keep.div_(keep_prob.clamp_min(torch.finfo(torch.float32).tiny))

    def extra_repr(self) -> str:
        gamma = f", gamma={self.gamma:.4g}" if self.gamma is not None else ""
        return f"p={self.p}, total_steps={self.total_steps}, schedule={self.schedule}{gamma}"


def scheduled_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a :class:`DropoutScheduler` drives, by qualified name.

    ``torch.nn`` dropout and every :class:`DropoutLayer` whose ``p`` is a plain float attribute;
    :class:`CurriculumDropout` is left alone because it schedules itself.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.modules.dropout._DropoutNd, DropoutLayer))
        and not isinstance(module, CurriculumDropout)
        and is_real(vars(module).get("p"))
    }


class DropoutScheduler:
    """Drive the drop probability of every dropout layer of a model, like an LR scheduler.

    ``p`` is a drop probability. The scheduler remembers each layer's target rate (its ``p``
    at construction, or ``target_p`` for all) and after ``t`` calls of :meth:`step` sets
    ``p = target * f(t)``:

    * ``kind="curriculum"`` (Morerio et al., 2017): ``f = ramp`` of ``schedule``
      (see :class:`CurriculumDropout`), from 0 to 1 over ``total_steps``;
    * ``kind="early"`` (Liu et al., 2023, "Dropout Reduces Underfitting"): ``f = 1`` for the
      first ``switch_step`` steps, then 0;
    * ``kind="late"`` (Liu et al., 2023): ``f = 0`` until ``switch_step``, then 1.

    The rate for step 0 is applied at construction. Driven layers are ``torch.nn`` dropout
    and every ``DropoutLayer`` with a plain float ``p``, except :class:`CurriculumDropout`.

    ``torch.compile`` specialises on a float attribute, so every new value of ``p`` costs one
    recompile (and past ``torch._dynamo.config.recompile_limit`` the model falls back to
    eager). The scheduler therefore writes ``p`` only when the value changes: early and late
    dropout recompile once. A curriculum changes ``p`` every step; ``levels`` rounds
    ``f`` to multiples of ``1 / levels``, bounding the distinct values to ``levels + 1``. For
    compiled models prefer :class:`CurriculumDropout`, whose rate is a tensor and never
    recompiles.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: str = "exponential",
        total_steps: int | None = None,
        target_p: float | None = None,
        kind: str = "curriculum",
        switch_step: int | None = None,
        gamma: float | None = None,
        levels: int | None = None,
    ) -> None:
        check_choice(kind, KINDS, "kind")
        check_choice(schedule, SCHEDULES, "schedule")
        if kind == "curriculum":
            total_steps = check_int(total_steps, "total_steps", low=1)
            gamma = resolve_gamma(schedule, gamma, total_steps)
        else:
            switch_step = check_int(switch_step, "switch_step", low=1)
        self.levels = None if levels is None else check_int(levels, "levels", low=1)
        self.kind = kind
        self.schedule = schedule
        self.total_steps = total_steps
        self.switch_step = switch_step
        self.gamma = gamma
        self.layers = scheduled_layers(model)
        if target_p is not None:
            target_p = check_probability(target_p, "target_p")
        self.targets = {
            name: target_p if target_p is not None else float(layer.p)
            for name, layer in self.layers.items()
        }
        self.last_step = 0
        self.apply()

    def factor(self, step: int) -> float:
        """The fraction of each layer's target rate used at ``step``."""
        if self.kind == "early":
            return 1.0 if step < self.switch_step else 0.0
        if self.kind == "late":
            return 0.0 if step < self.switch_step else 1.0
        t = torch.tensor(float(step), dtype=torch.float64)
        fraction = float(ramp(self.schedule, t, self.total_steps, self.gamma))
        if self.levels is not None:
            fraction = round(fraction * self.levels) / self.levels
        return fraction

    def rates(self) -> dict[str, float]:
        """The drop probability each driven layer uses now, by qualified name."""
        return {name: layer.p for name, layer in self.layers.items()}

    def step(self) -> None:
        """Advance one step and update the layers' rates."""
        self.last_step += 1
        self.apply()

    def apply(self) -> None:
        factor = self.factor(self.last_step)
        for name, layer in self.layers.items():
            rate = self.targets[name] * factor
            if layer.p != rate:
                layer.p = rate

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "targets": dict(self.targets)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step and targets, then set the layers' rates for that step."""
        if set(state["targets"]) != set(self.layers):
            raise ValueError(
                f"state targets {sorted(state['targets'])} do not match the model's dropout "
                f"layers {sorted(self.layers)}"
            )
        self.targets = dict(state["targets"])
        self.last_step = int(state["last_step"])
        self.apply()

    def __repr__(self) -> str:
        detail = (
            f"schedule={self.schedule}, total_steps={self.total_steps}"
            if self.kind == "curriculum"
            else f"switch_step={self.switch_step}"
        )
        return (
            f"{type(self).__name__}(kind={self.kind}, {detail}, layers={len(self.layers)}, "
            f"last_step={self.last_step})"
        )
