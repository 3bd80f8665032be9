"""Forward+backward time of every autodropout layer relative to ``torch.nn.Dropout``.

For a (64, 64, 32, 32) float32 activation each layer's training forward+backward is timed
alternately with ``torch.nn.Dropout`` of the same rate on the same input (so drift and load
from other processes hit both), and the ratio of the medians is printed as a Markdown table.
Rows with a performance target get a PASS/MISS verdict.

    python benchmarks/layers.py --repeats 30 --device cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import autodropout

SHAPE = (64, 64, 32, 32)  # (N, C, H, W)
P = 0.1


def as_image(x: Tensor) -> Tensor:
    return x


def as_sequence(x: Tensor) -> Tensor:
    """(N, T, C): one time step per pixel."""
    return x.flatten(2).transpose(1, 2).contiguous()


def as_channels_last(x: Tensor) -> Tensor:
    """(N, H, W, C): features on the last axis."""
    return x.permute(0, 2, 3, 1).contiguous()


def as_rows(x: Tensor) -> Tensor:
    """(N*H*W, C): one row per pixel, for layers that wrap an nn.Linear."""
    return as_channels_last(x).flatten(0, 2)


def as_relu_output(x: Tensor) -> Tensor:
    return x.relu()


class DenseDropBlockReference(nn.Module):
    """The dense max-pool DropBlock (Bernoulli on the full map, then max_pool2d), for comparison."""

    def __init__(self, p: float, block_size: int) -> None:
        super().__init__()
        self.p, self.block_size = p, block_size

    def forward(self, x: Tensor) -> Tensor:
        size = self.block_size
        height, width = x.shape[-2:]
        gamma = self.p / size**2 * height * width / ((height - size + 1) * (width - size + 1))
        corners = torch.zeros_like(x)
        corners[..., : height - size + 1, : width - size + 1].bernoulli_(gamma)
        dropped = F.max_pool2d(F.pad(corners, (size - 1, 0, size - 1, 0)), size, stride=1)
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum())


@dataclass
class Row:
    label: str
    make: Callable[[], nn.Module] | None  # None: the layer is not importable yet
    shape_input: Callable[[Tensor], Tensor] = as_image
    note: str = ""
    target: float | None = None


def layer(name: str) -> Callable[..., nn.Module] | None:
    return getattr(autodropout, name, None)


def family_rows() -> list[Row]:
    """One row per layer of layer_api.md, built from the agreed constructor signatures."""

    def row(name: str, args: Callable[[Callable], nn.Module], **kwargs) -> Row:
        cls = layer(name)
        return Row(name, None if cls is None else (lambda: args(cls)), **kwargs)

    conv = "wraps nn.Conv2d(64, 64, 1)"
    return [
        Row("torch.nn.Dropout (noise check)", lambda: nn.Dropout(P), note="baseline vs itself"),
        row("Dropout", lambda c: c(P)),
        row("GaussianDropout", lambda c: c(P)),
        row("AlphaDropout", lambda c: c(P)),
        row("FeatureAlphaDropout", lambda c: c(P)),
        row("SpatialDropout", lambda c: c(P, spatial_dims=2)),
        row("LockedDropout", lambda c: c(P, batch_first=True), shape_input=as_sequence,
            note="(N, T=1024, C)"),
        row("DropConnect", lambda c: c(nn.Conv2d(64, 64, 1), p=P), note=conv),
        row("VariationalDropout", lambda c: c(nn.Conv2d(64, 64, 1), p=P), note=conv),
        row("SparseVariationalDropout", lambda c: c(nn.Conv2d(64, 64, 1)), note=conv),
        row("ConcreteDropout", lambda c: c(p=P), note="no module"),
        row("Standout", lambda c: c(nn.Linear(64, 64)), shape_input=as_rows,
            note="wraps nn.Linear(64, 64), (N*H*W, C)"),
        row("Jumpout", lambda c: c(), shape_input=as_relu_output, note="ReLU input, defaults"),
        row("RelevanceDropout", lambda c: c(P), shape_input=as_channels_last, note="(N, H, W, C)"),
        row("CurriculumDropout", lambda c: c(P, total_steps=1000)),
        row("DropBlock2d", lambda c: c(P, block_size=7), note="per-channel, block 7", target=1.0),
        row("DropBlock2d", lambda c: c(P, block_size=7, share_channels=True),
            note="channel-shared, block 7", target=0.3),
        row("DropPath", lambda c: c(P)),
        Row("reference: nn.Conv2d(64, 64, 1)", lambda: nn.Conv2d(64, 64, 1),
            note="the wrapped op alone"),
        Row("reference: nn.Linear(64, 64)", lambda: nn.Linear(64, 64), shape_input=as_rows,
            note="the wrapped op alone"),
        Row("reference: dense max-pool DropBlock", lambda: DenseDropBlockReference(P, 7),
            note="per-channel, block 7"),
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward_timer(module: nn.Module, x: Tensor) -> Callable[[], float]:
    """A callable that runs one training forward+backward and returns its seconds."""
    x = x.detach().requires_grad_()
    grad = torch.randn_like(module(x))
    tensors = [x, *module.parameters()]

    def run() -> float:
        for tensor in tensors:
            tensor.grad = None
        synchronize(x.device)
        start = time.perf_counter()
        module(x).backward(grad)
        synchronize(x.device)
        return time.perf_counter() - start

    return run


def time_against_baseline(
    row: Row, activation: Tensor, repeats: int, warmup: int
) -> tuple[float, float]:
    """Median seconds of the row's layer and of nn.Dropout(P), measured interleaved."""
    x = row.shape_input(activation)
    candidate = forward_backward_timer(row.make().to(activation.device).train(), x)
    baseline = forward_backward_timer(nn.Dropout(P).train(), x)
    for _ in range(warmup):
        candidate(), baseline()
    candidate_times, baseline_times = [], []
    for repeat in range(repeats):
        if repeat % 2:  # alternate which goes first
            baseline_times.append(baseline())
            candidate_times.append(candidate())
        else:
            candidate_times.append(candidate())
            baseline_times.append(baseline())
    return statistics.median(candidate_times), statistics.median(baseline_times)


def table(rows: list[Row], activation: Tensor, repeats: int, warmup: int) -> list[str]:
    lines = [
        f"| layer | input / note | layer ms | nn.Dropout({P}) ms | ratio | target | result |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        target = "" if row.target is None else f"<= {row.target:.1f}x"
        if row.make is None:
            cells = ["not yet available", "", "", target, ""]
        else:
            layer_s, base_s = time_against_baseline(row, activation, repeats, warmup)
            ratio = layer_s / base_s
            verdict = "" if row.target is None else ("PASS" if ratio <= row.target else "MISS")
            cells = [f"{layer_s * 1e3:.2f}", f"{base_s * 1e3:.2f}", f"{ratio:.2f}x", target, verdict]
        lines.append("| " + " | ".join([row.label, row.note, *cells]) + " |")
    return lines


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    return torch.device(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per layer (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per layer first")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's choice); 1 takes parallel-kernel start-up "
        "out of the comparison on a machine whose cores are busy",
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="TEXT",
        help="only rows whose label contains TEXT (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    activation = torch.randn(SHAPE, device=device)
    load_before = load_average()
    print(
        f"Forward+backward, activation {tuple(SHAPE)} float32 on {device} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads), p={P} unless noted; "
        f"median of {args.repeats} repeats interleaved with nn.Dropout({P}) on the same input.\n"
    )
    rows = [row for row in family_rows() if not args.only or any(t in row.label for t in args.only)]
    for line in table(rows, activation, args.repeats, args.warmup):
        print(line, flush=True)
    print(f"\nLoad average over 1 min at start / end: {load_before} / {load_average()}")


def load_average() -> str:
    """The host's 1-minute load: on a busy CPU each parallel kernel waits for free cores."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    main()
