"""Controllers propose patterns and learn from rewards, behind one small interface.

``RLController`` is the paper's: an autoregressive policy trained with REINFORCE, a moving
average baseline, an entropy bonus, gradient clipping and Adam. Workers run asynchronously,
so a reward may arrive for tokens sampled by an older policy; the update corrects for that
with PPO-style clipped importance weights (the ratio of current to sampling probability).
``RandomController`` samples uniformly and never learns: the baseline to beat.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from autodropout.patterns import Pattern
from search_spaces import SearchSpace
from search_spaces.settings import CONTROLLER_DEFAULTS

from .policy import PatternPolicy

DEFAULTS = CONTROLLER_DEFAULTS
"""The RL controller's settings and defaults: :data:`search_spaces.settings.CONTROLLER_DEFAULTS`
(one table); a space's ``controller:`` section and the command line override them."""


@dataclass(frozen=True)
class Suggestion:
    """A proposed pattern with the tokens and per-token log-probabilities it was sampled with."""

    pattern: Pattern
    tokens: tuple[int, ...]
    log_probs: tuple[float, ...]

    @property
    def log_prob(self) -> float:
        return math.fsum(self.log_probs)


@dataclass
class Controller:
    """The interface the Ray Tune searcher drives."""

    space: SearchSpace
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)
    masks: Any = field(init=False, repr=False, compare=False)
    """The space's :attr:`~search_spaces.SearchSpace.choice_masks` (None without ``max_drop``)."""

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.masks = self.space.choice_masks

    def suggest(self) -> Suggestion:
        raise NotImplementedError

    def observe(self, suggestion: Suggestion, reward: float) -> None:
        """Learn from the reward of a suggestion (possibly sampled by an older policy)."""

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class RandomController(Controller):
    """Uniform random search over the space's decisions."""

    def suggest(self) -> Suggestion:
        tokens, log_probs = [], []
        for step, decision in enumerate(self.space.decisions):
            count = len(decision.choices)
            # max_drop: uniform over the patterns within the bound
            weights = None if self.masks is None else self.masks.weights(step, tokens)
            if weights is None:
                tokens.append(int(torch.randint(count, (1,), generator=self.generator)))
                log_probs.append(-math.log(count))
            else:
                weights = torch.tensor(weights, dtype=torch.float64)
                tokens.append(int(torch.multinomial(weights, 1, generator=self.generator)))
                log_probs.append(math.log(weights[tokens[-1]] / weights.sum()))
        return Suggestion(self.space.decode(tokens), tuple(tokens), tuple(log_probs))


def clipped_importance_weights(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor,
                               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ratio pi_new/pi_old of whole sequences and the ratio clipped to [1-clip, 1+clip]."""
    ratio = torch.exp(new_log_prob - old_log_prob)
    return ratio, ratio.clamp(1.0 - clip, 1.0 + clip)


class RLController(Controller):
    """REINFORCE with a moving-average baseline and clipped importance weights.

    For each batch of ``update_every`` observed rewards R_i with sampling log-probs
    log q_i, the loss is (the PPO clipped surrogate; at ratio 1 it is plain REINFORCE)::

        A_i = R_i - b                           b: moving average of rewards, decay d
        r_i = pi(tokens_i) / q(tokens_i)
        L   = -mean_i min(r_i A_i, clip(r_i, 1-eps, 1+eps) A_i) - beta * mean_i H_i

    then gradient-norm clipping and one Adam step. H_i is the summed entropy of the
    decisions along sample i.

    Multi-fidelity searches (ASHA) also observe rewards at intermediate *rungs*
    (``observe(suggestion, reward, rung=epoch)``): each rung has its own moving-average
    baseline (:attr:`rung_baselines`), so ``A_i = R_i - b_rung(i)`` compares a reward only
    with rewards of the same budget; :attr:`baseline` is the full-budget one (``rung=None``),
    the only one a search without a scheduler uses. The rule is :mod:`controller.outcome`'s.
    """

    def __init__(self, space: SearchSpace, seed: int = 0, **settings: Any) -> None:
        super().__init__(space, seed)
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown controller setting {unknown[0]!r}")
        self.settings = {**DEFAULTS, **settings}
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.policy = PatternPolicy(
                [len(d.choices) for d in space.decisions],
                hidden_size=self.settings["hidden_size"],
                layers=self.settings["layers"],
                heads=self.settings["heads"],
                architecture=self.settings["architecture"],
            )
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.settings["lr"])
        self.baseline: float | None = None
        self.rung_baselines: dict[int, float] = {}
        self.pending: list[tuple[Suggestion, float]] = []
        self.updates = 0

    def suggest(self) -> Suggestion:
        tokens, log_probs = self.policy.sample(1, generator=self.generator,
                                               allowed=self.masks)
        indices = tuple(int(t) for t in tokens[0])
        return Suggestion(self.space.decode(indices), indices, tuple(log_probs[0].tolist()))

    def observe(self, suggestion: Suggestion, reward: float, rung: int | None = None) -> None:
        """Learn from ``reward``: the full-budget reward (``rung=None``) or the reward after
        ``rung`` epochs, compared only with other rewards of that rung."""
        self.pending.append((suggestion, float(reward)) if rung is None
                            else (suggestion, float(reward), int(rung)))
        if len(self.pending) >= self.settings["update_every"]:
            self.update(self.pending)
            self.pending = []

    def baseline_of(self, rung: int | None = None) -> float | None:
        """The moving-average baseline of ``rung`` (``None``: the full budget)."""
        return self.baseline if rung is None else self.rung_baselines.get(rung)

    def update(self, batch: list[tuple]) -> dict[str, float]:
        """One policy step on ``batch``: ``(suggestion, reward)`` entries (full budget) or
        ``(suggestion, reward, rung)``."""
        rungs = [entry[2] if len(entry) > 2 else None for entry in batch]
        rewards = torch.tensor([entry[1] for entry in batch])
        tokens = torch.tensor([entry[0].tokens for entry in batch], dtype=torch.long)
        old_log_prob = torch.tensor([entry[0].log_prob for entry in batch])

        decay = self.settings["baseline_decay"]
        for reward, rung in zip(rewards.tolist(), rungs):  # the baselines exclude nothing newer than the batch
            old = self.baseline_of(rung)
            new = reward if old is None else decay * old + (1 - decay) * reward
            if rung is None:
                self.baseline = new
            else:
                self.rung_baselines[rung] = new
        advantage = rewards - torch.tensor([self.baseline_of(rung) for rung in rungs])

        log_probs, entropies = self.policy.score(tokens, allowed=self.masks)
        ratio, clipped = clipped_importance_weights(log_probs.sum(1), old_log_prob,
                                                    self.settings["importance_clip"])
        surrogate = torch.minimum(ratio * advantage, clipped * advantage)
        entropy = entropies.sum(1)
        loss = -surrogate.mean() - self.settings["entropy_weight"] * entropy.mean()

        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.settings["grad_clip"])
        self.optimizer.step()
        self.updates += 1
        return {"loss": loss.item(), "baseline": self.baseline, "grad_norm": grad_norm.item(),
                "mean_ratio": ratio.mean().item(), "entropy": entropy.mean().item()}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
            "rung_baselines": dict(self.rung_baselines),
            "pending": [(entry[0].tokens, entry[0].log_probs, *entry[1:]) for entry in self.pending],
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
        self.rung_baselines = {int(rung): value for rung, value
                               in state.get("rung_baselines", {}).items()}  # older states: none
        self.pending = [
            (Suggestion(self.space.decode(tokens), tuple(tokens), tuple(log_probs)), *rest)
            for tokens, log_probs, *rest in state["pending"]
        ]
        self.updates = state["updates"]

    def warm_start(self, state: dict[str, Any]) -> None:
        """Start from an earlier search's policy (same space), with a fresh baseline."""
        self.policy.load_state_dict(state["policy"])


def serialize_state(controller: Controller) -> bytes:
    buffer = io.BytesIO()
    torch.save(controller.state_dict(), buffer)
    return buffer.getvalue()


def deserialize_state(blob: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(blob), weights_only=True)
