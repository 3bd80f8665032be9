"""Forward+backward cost of ``PatternDropout`` sites against ``torch.nn.Dropout``.

Each row times, on one activation and interleaved (site, dropout, floor, site, ...):
the pattern site, ``nn.Dropout(p=0.1)``, and the *floor*: multiplying by a precomputed
mask of the site's mask shape (what any masking layer must pay). The ratio column is
site / ``nn.Dropout`` (medians).

The batch table times the conv sites at batch 16 and 256 and compares the per-example
costs. Elementwise work alone is not flat on a CPU (a batch of 16 stays in cache, 256 does
not, and fresh large tensors are page-faulted in), so the verdict compares the site's ratio
with the floor's: equal ratios mean drawing the masks scales exactly like applying them.

    python benchmarks/patterns.py [--repeats 30] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from autodropout.patterns import PatternDropout

CONV_SITE = dict(
    size_h=5, size_w=3, stride=8, repeat="fill", rotate=30.0, shear_x=0.1, shear_y=0.0,
    share_c=True, residual=False,
)
SEQUENCE_SITE = dict(
    size=8, stride=32, repeat="fill", axis="tokens", share=True, apply_to=["ffn_hidden"],
)
CONV_SHAPE = (64, 64, 32, 32)
SEQUENCE_SHAPE = (32, 128, 512)
ATTENTION_SHAPE = (32, 8, 128, 128)
SHARE_C_TARGET = 0.3
PER_CHANNEL_TARGET = 1.0
SEQUENCE_TARGET = 1.0
BATCHES = (16, 256)
FLAT_BOUNDS = (2 / 3, 3 / 2)


class MaskMultiply(nn.Module):
    """The floor: multiply by a fixed mask shaped like ``layer``'s mask for ``x``."""

    def __init__(self, layer: PatternDropout, x: Tensor) -> None:
        super().__init__()
        self.mask = layer.keep_mask(x).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


def step(layer: nn.Module, x: Tensor, grad: Tensor) -> None:
    x.grad = None
    layer(x).backward(grad)


def interleaved_medians(
    steps: list[Callable[[], None]], repeats: int, device: torch.device
) -> list[float]:
    """Median wall time (s) of each step, measured round-robin after a warm-up round."""
    times: list[list[float]] = [[] for _ in steps]
    for round_index in range(repeats + 1):
        for timings, run in zip(times, steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index:  # the first round warms caches, allocators and mask tables
                timings.append(time.perf_counter() - start)
    return [statistics.median(timings) for timings in times]


def activation(shape: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    x = torch.randn(shape, device=device, requires_grad=True)
    return x, torch.randn(shape, device=device)


def time_row(
    layer: PatternDropout, shape: tuple[int, ...], repeats: int, device: torch.device
) -> list[float]:
    """Medians of (site, nn.Dropout, floor) on one activation of ``shape``."""
    x, grad = activation(shape, device)
    layers = [layer.train(), nn.Dropout(0.1).train(), MaskMultiply(layer, x.detach())]
    return interleaved_medians(
        [lambda layer=layer: step(layer, x, grad) for layer in layers], repeats, device
    )


def per_example(
    layer: PatternDropout, shape: tuple[int, ...], repeats: int, device: torch.device
) -> list[list[float]]:
    """Per-example medians of (site, floor), one list per batch size in BATCHES."""
    runs = []
    for batch in BATCHES:
        x, grad = activation((batch, *shape[1:]), device)
        for timed in (layer.train(), MaskMultiply(layer, x.detach())):
            runs.append(lambda timed=timed, x=x, grad=grad: step(timed, x, grad))
    medians = interleaved_medians(runs, repeats, device)
    return [[t / batch for t in medians[2 * i : 2 * i + 2]] for i, batch in enumerate(BATCHES)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    share_c = PatternDropout(CONV_SITE)
    per_channel = PatternDropout({**CONV_SITE, "share_c": False})
    tokens = PatternDropout(SEQUENCE_SITE, "sequence", "ffn_hidden")
    per_feature = PatternDropout({**SEQUENCE_SITE, "share": False}, "sequence", "ffn_hidden")
    features = PatternDropout(
        {**SEQUENCE_SITE, "axis": "features", "share": False}, "sequence", "ffn_hidden"
    )
    both = PatternDropout({**SEQUENCE_SITE, "axis": "both"}, "sequence", "ffn_hidden")
    attention = PatternDropout(
        {**SEQUENCE_SITE, "share": False, "apply_to": ["attention_probs"]},
        "sequence", "attention_probs",
    )
    rows = [
        ("conv share_c", share_c, CONV_SHAPE, SHARE_C_TARGET),
        ("conv per-channel", per_channel, CONV_SHAPE, PER_CHANNEL_TARGET),
        ("sequence tokens, shared", tokens, SEQUENCE_SHAPE, SEQUENCE_TARGET),
        ("sequence tokens, per feature", per_feature, SEQUENCE_SHAPE, SEQUENCE_TARGET),
        ("sequence features, per token", features, SEQUENCE_SHAPE, SEQUENCE_TARGET),
        ("sequence both", both, SEQUENCE_SHAPE, SEQUENCE_TARGET),
        ("attention_probs tokens, per head", attention, ATTENTION_SHAPE, SEQUENCE_TARGET),
    ]
    print(f"device: {device}, threads: {torch.get_num_threads()}, repeats: {args.repeats}")
    print(f"conv site: {share_c.extra_repr()}")
    print(f"sequence site: {tokens.extra_repr()}\n")
    print("| case | shape | site ms | nn.Dropout ms | floor ms | ratio | target | result |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for name, layer, shape, target in rows:
        site, dropout, floor = time_row(layer, shape, args.repeats, device)
        ratio = site / dropout
        print(
            f"| {name} | {shape} | {site * 1e3:.3f} | {dropout * 1e3:.3f} | {floor * 1e3:.3f} "
            f"| {ratio:.2f}x | <= {target:.1f}x | {'PASS' if ratio <= target else 'MISS'} |"
        )

    low, high = FLAT_BOUNDS
    small, large = BATCHES
    print(
        f"\n| case | ms/example, batch {small} | ms/example, batch {large} | ratio "
        f"| floor ratio | target: ratio / floor ratio | result |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for name, layer in (("conv share_c", share_c), ("conv per-channel", per_channel)):
        (site_small, floor_small), (site_large, floor_large) = per_example(
            layer, CONV_SHAPE, args.repeats, device
        )
        ratio, floor_ratio = site_small / site_large, floor_small / floor_large
        verdict = "PASS" if low <= ratio / floor_ratio <= high else "MISS"
        print(
            f"| {name} | {site_small * 1e3:.4f} | {site_large * 1e3:.4f} | {ratio:.2f} "
            f"| {floor_ratio:.2f} | {low:.2f} to {high:.2f} (got {ratio / floor_ratio:.2f}) "
            f"| {verdict} |"
        )


if __name__ == "__main__":
    main()
