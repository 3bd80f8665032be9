"""Controller latency benchmark: ``RLController.suggest`` before and after incremental decoding.

For each shipped space (``convnet``: 33 decisions, ``transformer``: 25) and each policy
architecture, times ``--calls`` calls of

* old: the full-recompute sampler the policy had before its K/V cache (a reference copy
  below, a measurement baseline only: each step re-runs the body over the whole prefix);
* new: ``controller.controllers.RLController(space).suggest()`` (what the searcher calls),

on the same policy weights, interleaved call by call so that load on the machine hits both
alike. Prints a Markdown table of the median and p90 wall milliseconds, the old/new ratio of
the medians, whether the new median meets the target, and the median CPU milliseconds of the
calling thread (less skewed by other work on the machine), then the load average.

    python benchmarks/controller_latency.py                # 300 calls each, 1 torch thread
    python benchmarks/controller_latency.py --calls 1000 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

TARGET_MS = 2.0
SPACES = ("convnet", "transformer")
ARCHITECTURES = ("transformer", "lstm")


@torch.no_grad()
def reference_sample(policy, batch: int = 1, generator: torch.Generator | None = None):
    """``PatternPolicy.sample`` as it was before the K/V cache: the whole prefix per step."""
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=policy.start.device)
    log_probs = []
    state = None
    for step in range(policy.num_decisions):
        if policy.architecture == "lstm":
            step_input = policy._inputs(tokens)[:, -1:]
            output, state = policy.body(step_input, state)
            hidden = output[:, -1]
        else:
            hidden = policy._hidden(policy._inputs(tokens))[:, -1]
        logits = policy._logits(hidden, step)
        choice = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        log_probs.append(torch.log_softmax(logits, -1).gather(1, choice))
        tokens = torch.cat([tokens, choice], dim=1)
    return tokens, torch.cat(log_probs, dim=1)


def reference_suggest(controller) -> tuple[int, ...]:
    """What ``RLController.suggest`` did with the reference sampler (decoding included)."""
    tokens, log_probs = reference_sample(controller.policy, 1, generator=controller.generator)
    indices = tuple(int(t) for t in tokens[0])
    controller.space.decode(indices)
    tuple(log_probs[0].tolist())
    return indices


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def time_calls(functions: dict[str, Callable[[], object]], calls: int) -> dict[str, list[float]]:
    """Wall and CPU (this thread's) milliseconds per call of each function, under ``name`` and
    ``name + "_cpu"``, the functions taking turns call by call."""
    times: dict[str, list[float]] = {key: [] for name in functions for key in (name, f"{name}_cpu")}
    for function in functions.values():  # warm-up
        for _ in range(max(3, calls // 20)):
            function()
    for _ in range(calls):
        for name, function in functions.items():
            started, cpu_started = time.perf_counter(), time.thread_time()
            function()
            times[f"{name}_cpu"].append(1000 * (time.thread_time() - cpu_started))
            times[name].append(1000 * (time.perf_counter() - started))
    return times


def measure(space_name: str, architecture: str, calls: int) -> dict[str, object]:
    import search_spaces
    from controller.controllers import RLController

    space = search_spaces.load(space_name)
    settings = {**space.controller, "architecture": architecture}
    settings.pop("reward", None)
    new = RLController(space, seed=0, **settings)
    old = RLController(space, seed=0, **settings)  # same seed: the same weights and stream
    old.policy.load_state_dict(new.policy.state_dict())
    times = time_calls({"old": lambda: reference_suggest(old), "new": new.suggest}, calls)
    row: dict[str, object] = {"space": space_name, "decisions": len(space.decisions),
                              "architecture": architecture}
    for name, values in times.items():
        row[f"{name}_median"] = statistics.median(values)
        row[f"{name}_p90"] = percentile(values, 0.9)  # the _cpu p90s go unprinted
    row["ratio"] = row["old_median"] / row["new_median"]
    row["met"] = row["new_median"] < TARGET_MS
    return row


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| space | decisions | policy | old median ms | old p90 ms | new median ms | new p90 ms "
        f"| old/new | new < {TARGET_MS:g} ms | old CPU median ms | new CPU median ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['space']} | {row['decisions']} | {row['architecture']} "
            f"| {row['old_median']:.2f} | {row['old_p90']:.2f} "
            f"| {row['new_median']:.2f} | {row['new_p90']:.2f} "
            f"| {row['ratio']:.1f}x | {'yes' if row['met'] else 'NO'} "
            f"| {row['old_cpu_median']:.2f} | {row['new_cpu_median']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per sampler (default 300)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.calls < 1 or args.threads < 1:
        parser.error("--calls and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    rows = [measure(space, architecture, args.calls)
            for space in SPACES for architecture in ARCHITECTURES]
    print(f"suggest latency, {args.calls} calls each, {args.threads} torch thread(s), "
          f"torch {torch.__version__}\n")
    print(table(rows))
    load = Path("/proc/loadavg")
    if load.exists():
        print(f"\nload average (1, 5, 15 min): {' '.join(load.read_text().split()[:3])}")


if __name__ == "__main__":
    main()
