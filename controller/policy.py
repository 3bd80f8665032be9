"""The autoregressive pattern policy: one categorical head per decision of a search space.

Token t is chosen from decision t's choices, conditioned on the tokens chosen before it
(Pham & Le 2021 use a Transformer decoder; an LSTM is offered too). Scoring given tokens
(for the update) runs all decisions in one pass through the ``nn`` modules. Sampling runs
one decision at a time and carries state between steps instead of re-running the prefix:
the LSTM its (h, c), the Transformer each layer's keys and values (a KV cache), with the
layer math written out on the weights of the same ``nn.TransformerEncoderLayer`` modules
(so ``state_dict`` keys are unchanged). Both give the log-probabilities ``score`` gives, to
float32 rounding; the random stream is consumed as by one ``torch.multinomial`` per step.

Masks (``allowed``): a search space with ``max_drop`` forbids, at some steps, the choices
that leave no completion within the bound. ``sample`` and ``score`` take the same
``allowed``: either a :class:`search_spaces.bounds.ChoiceMasks` (precomputed tables, turned
into tensors once per object) or a callable ``allowed(step, prefix) -> (B, C) bool tensor or
None`` given the tokens (B, step) chosen so far. Disallowed logits are set to -inf before the
softmax, so sampled log-probabilities, ``score``'s log-probabilities and its entropies are
those of the masked distribution, and the importance ratio at the sampling policy is 1.

Shapes: B batch, T decisions, L steps so far, H hidden size, N heads, D = H / N, C choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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
        # Row r of the sampler's input table is step row_step[r]'s input: row 0 the start,
        # then the embedding rows of every decision but the last (whose tokens feed no step).
        self.input_rows = (1, *self.choice_counts[:-1])  # the step inputs the sampler may need
        row_step = torch.repeat_interleave(torch.arange(len(self.choice_counts)),
                                           torch.tensor(self.input_rows))
        self.register_buffer("row_step", row_step, persistent=False)
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
        start = self.start.expand(batch, 1, -1)  # (B, 1, H)
        previous = self.token_embedding(tokens + self.offsets[:length])  # (B, L, H)
        steps = torch.cat([start, previous], dim=1)  # (B, L+1, H)
        return steps + self.position.weight[: length + 1]  # (B, L+1, H)

    def _hidden(self, inputs: Tensor) -> Tensor:
        if self.architecture == "lstm":
            return self.body(inputs)[0]
        length = inputs.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=inputs.device)
        return self.body(inputs, mask=causal, is_causal=True)

    def _logits(self, hidden: Tensor, step: int) -> Tensor:
        return self.heads[step](hidden)

    def score(self, tokens: Tensor, allowed=None) -> tuple[Tensor, Tensor]:
        """Log-probability of each token and the entropy of each decision, both (B, T),
        under the masks ``allowed`` (see the module docstring) when given."""
        hidden = self._hidden(self._inputs(tokens[:, :-1]))
        masks = _step_masks(allowed, tokens.device)
        log_probs, entropies = [], []
        for step in range(self.num_decisions):
            logits = self._logits(hidden[:, step], step)
            mask = None if masks is None else masks(step, tokens[:, :step])
            if mask is None:
                distribution = torch.distributions.Categorical(logits=logits)
                log_probs.append(distribution.log_prob(tokens[:, step]))
                entropies.append(distribution.entropy())
                continue
            # A prefix no completion of which is allowed (only a sequence ``sample`` never
            # gives) scores -inf, with finite values and gradients everywhere else.
            mask = mask.expand_as(logits)
            usable = mask | ~mask.any(-1, keepdim=True)  # (B, C)
            log_p = torch.log_softmax(logits.masked_fill(~usable, float("-inf")), -1)  # (B, C)
            token = tokens[:, step : step + 1]
            chosen = log_p.gather(1, token)[:, 0]
            log_probs.append(chosen.masked_fill(~mask.gather(1, token)[:, 0], float("-inf")))
            entropies.append(-(log_p.exp() * log_p.masked_fill(~usable, 0.0)).sum(-1))
        return torch.stack(log_probs, 1), torch.stack(entropies, 1)

    def sample(self, batch: int = 1, generator: torch.Generator | None = None,
               allowed=None) -> tuple[Tensor, Tensor]:
        """Sample ``batch`` token sequences; returns tokens (B, T) and their log-probs (B, T).

        One step per decision, carrying the body's state (see :class:`_TransformerDecoder`,
        :class:`_LSTMDecoder`); the log-probabilities equal ``score``'s to float32 rounding.
        With ``allowed`` (module docstring) a disallowed choice has probability 0.
        """
        with torch.inference_mode():
            tokens, log_probs = self._sample(batch, generator, allowed)
        return tokens.clone(), log_probs.clone()  # normal tensors: usable in autograd later

    def _sample(self, batch: int, generator: torch.Generator | None,
                allowed=None) -> tuple[Tensor, Tensor]:
        masks = _step_masks(allowed, self.start.device)
        decoder_type = _LSTMDecoder if self.architecture == "lstm" else _TransformerDecoder
        decoder = decoder_type(self.body, batch, self.num_decisions)
        tables = decoder.table(self._input_table()).split(self.input_rows)  # T x (C_{t-1}, W)
        heads = [(head.weight, head.bias) for head in self.heads]
        choice = torch.zeros(batch, 1, dtype=torch.long, device=self.start.device)  # (B, 1)
        choices, probabilities = [], []
        for step, (rows, (weight, bias)) in enumerate(zip(tables, heads)):
            hidden = decoder.step(F.embedding(choice, rows), step)  # (B, 1, W) in, (B, H) out
            logits = F.linear(hidden, weight, bias)  # (B, C)
            mask = None if masks is None else masks(step, choices)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(logits, -1)  # (B, C)
            choice = _multinomial(probs, generator)  # (B, 1)
            choices.append(choice)
            probabilities.append(probs)
        tokens = torch.cat(choices, 1)  # (B, T)
        log_probs = torch.cat(probabilities, 1).gather(1, tokens + self.offsets).log()  # (B, T)
        if not torch.isfinite(log_probs).all():  # the check torch.multinomial makes, once
            raise RuntimeError("the policy's probabilities are not finite (diverged weights?)")
        return tokens, log_probs  # (B, T), (B, T)

    def _input_table(self) -> Tensor:
        """Every step input the sampler can need, (R, H): row 0 step 0's (the start), then
        step t's for each token of decision t-1 (``input_rows`` rows per step, in order)."""
        rows = torch.cat([self.start[None], self.token_embedding.weight[: self.offsets[-1]]])  # (R, H)
        return rows + self.position.weight[self.row_step]  # (R, H), added as ``_inputs`` does


class _TableMasks:
    """A :class:`search_spaces.bounds.ChoiceMasks` as tensors: per step, None or (prefix
    steps, their row multipliers, the (rows, C) bool table)."""

    def __init__(self, choice_masks, device: torch.device) -> None:
        self.steps = [
            None if mask is None or not mask.restricts
            else (mask.prefix, torch.tensor(mask.prefix, dtype=torch.long, device=device),
                  torch.tensor(mask.multipliers, dtype=torch.long, device=device),
                  torch.as_tensor(mask.allowed_table, dtype=torch.bool, device=device))
            for mask in choice_masks.steps
        ]

    def __call__(self, step: int, prefix) -> Tensor | None:
        """The (B, C) mask of ``step``; ``prefix`` is (B, step) tokens or a list of (B, 1)."""
        entry = self.steps[step]
        if entry is None:
            return None
        steps, step_index, multipliers, table = entry
        if not steps:  # the site's first bounded decision: one row for every sequence
            return table[0].expand(_batch(prefix), -1)
        if isinstance(prefix, Tensor):
            earlier = prefix.index_select(1, step_index)  # (B, k)
        else:
            earlier = torch.cat([prefix[p] for p in steps], 1)  # (B, k)
        return table.index_select(0, (earlier * multipliers).sum(1))  # (B, C)


def _batch(prefix) -> int:
    if isinstance(prefix, Tensor):
        return prefix.shape[0]
    return prefix[0].shape[0] if prefix else 1


class _CallableMasks:
    """A user callable ``allowed(step, prefix (B, step)) -> (B, C) bool or None``."""

    def __init__(self, allowed) -> None:
        self.allowed = allowed

    def __call__(self, step: int, prefix) -> Tensor | None:
        if not isinstance(prefix, Tensor):
            prefix = torch.cat(prefix, 1) if prefix else torch.zeros(1, 0, dtype=torch.long)
        mask = self.allowed(step, prefix)
        return None if mask is None else torch.as_tensor(mask, dtype=torch.bool).expand(
            prefix.shape[0], -1)


_table_cache: dict[tuple[int, str], tuple[object, _TableMasks]] = {}


def _step_masks(allowed, device: torch.device):
    """``allowed`` as a function (step, prefix) -> (B, C) bool mask or None; None for none."""
    if allowed is None:
        return None
    if hasattr(allowed, "steps"):  # precomputed tables: converted once per object and device
        key = (id(allowed), str(device))
        cached = _table_cache.get(key)
        if cached is None or cached[0] is not allowed:
            if len(_table_cache) >= 16:
                _table_cache.clear()
            cached = _table_cache[key] = (allowed, _TableMasks(allowed, device))
        return cached[1]
    if callable(allowed):
        return _CallableMasks(allowed)
    raise TypeError(f"allowed must be None, a ChoiceMasks or a callable, got {allowed!r}")


def _multinomial(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """``torch.multinomial(probs, 1, generator=generator)``, (B, C) -> (B, 1), minus its checks.

    For one sample ATen draws q ~ Exp(1) of probs' shape and takes argmax(probs / q): done
    here alike on CPU, the generator advances identically and the tokens are the same (a
    test pins it), but without the validity checks' three host syncs per step; ``sample``
    checks its log-probabilities once instead.
    """
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)  # (B, C)
    return (probs / noise).argmax(-1, keepdim=True)  # (B, 1)


class _TransformerDecoder:
    """One step at a time through ``nn.TransformerEncoderLayer`` weights, with a K/V cache.

    Each layer is pre-norm without dropout, as ``PatternPolicy`` builds it::

        x = x + out_proj(attention(q, K, V)),  q, k, v = in_proj(norm1(x))
        x = x + linear2(activation(linear1(norm2(x))))

    Step t appends its k, v to the layer's cache (B, 2, N, T, D) and attends over steps
    0..t (causal). Layer 0's q, k, v depend only on the step input, so :meth:`table`
    computes them for every possible input at once.
    """

    def __init__(self, body: nn.TransformerEncoder, batch: int, steps: int) -> None:
        self.layers = [_layer_weights(layer) for layer in body.layers]
        attention = body.layers[0].self_attn
        self.num_heads, self.head_size = attention.num_heads, attention.head_dim
        self.width = attention.embed_dim
        weight = attention.in_proj_weight
        shape = (batch, 2, self.num_heads, steps, self.head_size)
        self.caches = [weight.new_empty(shape) for _ in self.layers]

    def table(self, inputs: Tensor) -> Tensor:
        """Inputs (R, H) with layer 0's q, k, v of each, (R, 4H)."""
        first = self.layers[0]
        qkv = F.linear(_norm(inputs, first["norm1"]), *first["in_proj"])  # (R, 3H)
        return torch.cat([inputs, qkv], 1)  # (R, 4H)

    def step(self, row: Tensor, step: int) -> Tensor:
        """The last layer's output (B, H) at ``step`` from its ``table`` row (B, 1, 4H)."""
        x, qkv = row[:, 0, : self.width], row[:, 0, self.width :]  # (B, H), (B, 3H)
        for index, (layer, cache) in enumerate(zip(self.layers, self.caches)):
            if index:
                qkv = F.linear(_norm(x, layer["norm1"]), *layer["in_proj"])  # (B, 3H)
            x = x + F.linear(self._attend(qkv, cache, step), *layer["out_proj"])  # (B, H)
            inner = layer["activation"](F.linear(_norm(x, layer["norm2"]), *layer["linear1"]))  # (B, 2H)
            x = x + F.linear(inner, *layer["linear2"])  # (B, H)
        return x  # (B, H)

    def _attend(self, qkv: Tensor, cache: Tensor, step: int) -> Tensor:
        """Step ``step``'s query over the keys and values of steps 0..step, (B, H)."""
        batch, heads, size, width = qkv.shape[0], self.num_heads, self.head_size, self.width
        cache[:, :, :, step] = qkv[:, width:].view(batch, 2, heads, size)  # into (B, 2, N, T, D)
        keys, values = cache[:, :, :, : step + 1].unbind(1)  # (B, N, L+1, D) each
        query = qkv[:, :width].view(batch, heads, 1, size)  # (B, N, 1, D)
        out = F.scaled_dot_product_attention(query, keys, values)  # (B, N, 1, D)
        return out.view(batch, width)  # (B, H): heads side by side, as nn.MultiheadAttention


def _layer_weights(layer: nn.TransformerEncoderLayer) -> dict:
    """The tensors (and activation) of one encoder layer, looked up once per ``sample``."""
    attention = layer.self_attn
    return {
        "norm1": (layer.norm1.normalized_shape, layer.norm1.weight, layer.norm1.bias, layer.norm1.eps),
        "in_proj": (attention.in_proj_weight, attention.in_proj_bias),
        "out_proj": (attention.out_proj.weight, attention.out_proj.bias),
        "norm2": (layer.norm2.normalized_shape, layer.norm2.weight, layer.norm2.bias, layer.norm2.eps),
        "linear1": (layer.linear1.weight, layer.linear1.bias),
        "linear2": (layer.linear2.weight, layer.linear2.bias),
        "activation": layer.activation,
    }


def _norm(x: Tensor, norm: tuple) -> Tensor:
    return F.layer_norm(x, *norm)  # same shape as x


class _LSTMDecoder:
    """One step at a time through ``nn.LSTM`` weights, carrying (h, c) per layer."""

    def __init__(self, body: nn.LSTM, batch: int, steps: int) -> None:
        self.layers = [tuple(getattr(body, f"{name}_l{index}")
                             for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                       for index in range(body.num_layers)]
        zeros = body.weight_hh_l0.new_zeros(batch, body.hidden_size)  # (B, H)
        self.state = [(zeros, zeros)] * body.num_layers  # (h, c) per layer, zero as nn.LSTM starts

    @staticmethod
    def table(inputs: Tensor) -> Tensor:
        return inputs  # (R, H)

    def step(self, row: Tensor, step: int) -> Tensor:
        """The last layer's h (B, H) after the step input ``row`` (B, 1, H)."""
        x = row[:, 0]  # (B, H)
        for index, weights in enumerate(self.layers):
            self.state[index] = torch.lstm_cell(x, self.state[index], *weights)  # (B, H) x 2
            x = self.state[index][0]  # (B, H)
        return x  # (B, H)
