"""Child models the search trains with a pattern applied: a Wide ResNet and a GPT-style LM.

Both expose their pattern sites under stable names, so :func:`autodropout.apply_pattern`
finds them with its defaults: every ``BatchNorm2d`` of :class:`WideResNet` (conv patterns)
and the nanoGPT-style dropout slots of :class:`GPTLanguageModel` (sequence patterns).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autodropout.validation import check_int, check_probability

from .registry import MODELS


class WideBlock(nn.Module):
    """Pre-activation residual block of a Wide ResNet (Zagoruyko & Komodakis, 2016).

    ``y = conv2(drop(relu(bn2(conv1(a))))) + shortcut(s)`` with ``a = relu(bn1(x))``; the
    shortcut is a strided 1x1 convolution of ``a`` when the shape changes (``s = a``),
    otherwise :class:`~torch.nn.Identity` of ``s = x``. ``shortcut`` is always a module so
    that the residual branch can be hooked; it runs last, after ``bn2``. ``p`` of the
    in-block dropout is its drop probability.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, p: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(p)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.projects = stride != 1 or in_channels != out_channels
        if self.projects:
            self.shortcut: nn.Module = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        branch = self.conv1(activated)
        branch = self.conv2(self.dropout(F.relu(self.bn2(branch))))
        return branch + self.shortcut(activated if self.projects else x)


class WideResNet(nn.Module):
    """WRN-d-k, the pre-activation Wide ResNet of Zagoruyko & Komodakis (2016).

    ``depth = 6 n + 4``: a 3x3 stem convolution with 16 channels, then three groups of ``n``
    :class:`WideBlock` with ``16 k``, ``32 k``, ``64 k`` channels (``k = width``; the second
    and third groups halve the resolution), a final BatchNorm-ReLU, global average pooling
    and a linear classifier. ``dropout`` is the drop probability of the in-block dropout
    between the two convolutions (0 disables it, as AutoDropout's patterns replace it).

    AutoDropout's CIFAR-10 proxy was WRN-28-2 (Pham & Le, 2021). The default here, WRN-10-2
    (0.30 M parameters) on 28x28 single-channel images, is the CPU-sized proxy for
    Fashion-MNIST: one SGD step (forward + backward) at batch 128 measured 0.34 s on 2 CPU
    cores and 0.8-0.9 s on 1 (torch 2.13, shared machine), so 3 epochs of 4096 examples
    take about a minute; WRN-28-2 measured 2-6 s per step.
    """

    def __init__(
        self,
        depth: int = 10,
        width: int = 2,
        num_classes: int = 10,
        in_channels: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (check_int(depth, "depth", low=10) - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth!r}")
        check_int(width, "width", low=1)
        check_int(num_classes, "num_classes", low=1)
        check_int(in_channels, "in_channels", low=1)
        p = check_probability(dropout, "dropout")
        self.depth, self.width = depth, width
        blocks_per_group = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]

        self.conv = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        groups = []
        for group, stride in enumerate((1, 2, 2)):
            blocks = [
                WideBlock(channels[group] if i == 0 else channels[group + 1],
                          channels[group + 1], stride if i == 0 else 1, p)
                for i in range(blocks_per_group)
            ]
            groups.append(nn.Sequential(*blocks))
        self.group1, self.group2, self.group3 = groups
        self.bn = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.group3(self.group2(self.group1(self.conv(x))))
        x = F.relu(self.bn(x))
        return self.fc(x.mean(dim=(2, 3)))

    def extra_repr(self) -> str:
        return f"WRN-{self.depth}-{self.width}"


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with explicit attention probabilities.

    ``A = softmax(Q K^T / sqrt(d_head) + causal)``, ``y = resid_dropout(c_proj(attn_dropout(A) V))``.
    The probabilities are a real tensor (no fused kernel) so ``attn_dropout`` can see them,
    with shape (N, heads, T, T). ``p`` is the drop probability of both dropouts.
    """

    def __init__(self, d_model: int, n_heads: int, context: int, p: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model ({d_model}), got {n_heads}")
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(p)
        self.resid_dropout = nn.Dropout(p)
        causal = torch.ones(context, context, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(n, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        probs = self.attn_dropout(F.softmax(scores, dim=-1))
        y = (probs @ v).transpose(1, 2).reshape(n, t, c)
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    """Position-wise FFN ``y = dropout(c_proj(hidden_dropout(gelu(c_fc(x)))))``.

    ``p`` is the drop probability of both dropouts.
    """

    def __init__(self, d_model: int, d_ff: int, p: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff)
        self.hidden_dropout = nn.Dropout(p)
        self.c_proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(p)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.hidden_dropout(F.gelu(self.c_fc(x)))))


class TransformerBlock(nn.Module):
    """Pre-LN decoder block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, context: int, p: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, context, p)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, d_ff, p)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTLanguageModel(nn.Module):
    """Decoder-only, pre-LN GPT language model (Radford et al., 2019), nanoGPT layout.

    ``logits = lm_head(ln_f(blocks(drop(wte(idx) + wpe(pos)))))`` for token ids ``idx`` of
    shape (N, T) with ``T <= context``; the output has shape (N, T, vocab_size). ``dropout``
    is the drop probability of every dropout slot, which are the sequence-pattern sites:
    ``transformer.drop`` (embedding), ``transformer.h.<i>.attn.attn_dropout``
    (attention_probs), ``...attn.resid_dropout`` (attention_output),
    ``...mlp.hidden_dropout`` (ffn_hidden) and ``...mlp.dropout`` (ffn_output).
    ``tie_embeddings`` shares the token embedding with the output projection.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int = 64,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        for value, name in ((vocab_size, "vocab_size"), (context, "context"),
                            (d_model, "d_model"), (n_layers, "n_layers"), (n_heads, "n_heads")):
            check_int(value, name, low=1)
        d_ff = 4 * d_model if d_ff is None else check_int(d_ff, "d_ff", low=1)
        p = check_probability(dropout, "dropout")
        self.context = context
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, d_model),
                "wpe": nn.Embedding(context, d_model),
                "drop": nn.Dropout(p),
                "h": nn.ModuleList(
                    TransformerBlock(d_model, n_heads, d_ff, context, p) for _ in range(n_layers)
                ),
                "ln_f": nn.LayerNorm(d_model),
            }
        )
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layers)
        if tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, n_layers: int) -> None:
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # GPT-2: residual projections shrink with depth so the stream's variance stays put
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2 or idx.size(1) > self.context:
            raise ValueError(
                f"idx must have shape (N, T) with T <= context ({self.context}), "
                f"got {tuple(idx.shape)}"
            )
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def build_model(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build the child model ``name`` (a name or alias of :data:`~workers.registry.MODELS`:
    ``wrn``/``wide_resnet`` or ``gpt``) with ``kwargs``.

    Seeds torch's global generator with ``seed`` first, so the same seed and arguments
    give identical parameters.
    """
    model = MODELS.get(name, "name")
    torch.manual_seed(seed)
    return model(**kwargs)
