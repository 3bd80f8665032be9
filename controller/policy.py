"""The autoregressive pattern policy: one categorical head per decision of a search space.

Token t is chosen from decision t's choices, conditioned on the tokens chosen before it
(Pham & Le 2021 use a Transformer decoder; an LSTM is offered too). Sampling runs one
decision at a time; scoring given tokens (for the update) runs all decisions in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class PatternPolicy(nn.Module):
    """pi(tokens) = prod_t pi(token_t | token_<t) over the decisions' choice counts.

    The input at step t is a learned start vector (t = 0) or the embedding of the previous
    token (each decision has its own embedding rows), plus a position embedding for t.
    """

    def __init__(
        self,
        choice_counts: Sequence[int],
        hidden_size: int = 64,
        layers: int = 1,
        heads: int = 4,
        architecture: str = "transformer",
    ) -> None:
        super().__init__()
        if not choice_counts or min(choice_counts) < 1:
            raise ValueError(f"choice_counts must be positive, got {list(choice_counts)}")
        if architecture not in ("transformer", "lstm"):
            raise ValueError(f"architecture must be 'transformer' or 'lstm', got {architecture!r}")
        self.choice_counts = tuple(int(c) for c in choice_counts)
        self.architecture = architecture
        offsets = torch.tensor([0, *self.choice_counts[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.token_embedding = nn.Embedding(sum(self.choice_counts), hidden_size)
        self.start = nn.Parameter(torch.zeros(hidden_size))
        self.position = nn.Embedding(len(self.choice_counts), hidden_size)
        if architecture == "transformer":
            layer = nn.TransformerEncoderLayer(
                hidden_size, heads, 2 * hidden_size, dropout=0.0, batch_first=True, norm_first=True
            )
            self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            self.body = nn.LSTM(hidden_size, hidden_size, layers, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(hidden_size, count) for count in self.choice_counts)

    @property
    def num_decisions(self) -> int:
        return len(self.choice_counts)

    def _inputs(self, tokens: Tensor) -> Tensor:
        """Step inputs for the first ``tokens.shape[1] + 1`` decisions, shape (B, L+1, H)."""
        batch, length = tokens.shape
        start = self.start.expand(batch, 1, -1)
        previous = self.token_embedding(tokens + self.offsets[:length])
        steps = torch.cat([start, previous], dim=1)
        return steps + self.position.weight[: length + 1]

    def _hidden(self, inputs: Tensor) -> Tensor:
        if self.architecture == "lstm":
            return self.body(inputs)[0]
        length = inputs.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=inputs.device)
        return self.body(inputs, mask=causal, is_causal=True)

    def _logits(self, hidden: Tensor, step: int) -> Tensor:
        return self.heads[step](hidden)

    def score(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probability of each token and the entropy of each decision, both (B, T)."""
        hidden = self._hidden(self._inputs(tokens[:, :-1]))
        log_probs, entropies = [], []
        for step in range(self.num_decisions):
            distribution = torch.distributions.Categorical(logits=self._logits(hidden[:, step], step))
            log_probs.append(distribution.log_prob(tokens[:, step]))
            entropies.append(distribution.entropy())
        return torch.stack(log_probs, 1), torch.stack(entropies, 1)

    @torch.no_grad()
    def sample(self, batch: int = 1, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sample ``batch`` token sequences; returns tokens (B, T) and their log-probs (B, T)."""
        tokens = torch.zeros(batch, 0, dtype=torch.long, device=self.start.device)
        log_probs = []
        state = None
        for step in range(self.num_decisions):
            if self.architecture == "lstm":
                step_input = self._inputs(tokens)[:, -1:]
                output, state = self.body(step_input, state)
                hidden = output[:, -1]
            else:
                hidden = self._hidden(self._inputs(tokens))[:, -1]
            logits = self._logits(hidden, step)
            choice = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            log_probs.append(torch.log_softmax(logits, -1).gather(1, choice))
            tokens = torch.cat([tokens, choice], dim=1)
        return tokens, torch.cat(log_probs, dim=1)
