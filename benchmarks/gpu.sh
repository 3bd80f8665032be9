#!/usr/bin/env bash
# The GPU checks, in one go (under 8 minutes on one GPU): run from anywhere on a CUDA machine.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # OUT_DIR (default $OUT, else a temp dir) gets logs
#   bash benchmarks/gpu.sh --cpu-smoke [DIR]  # the same steps on the CPU, tiny sizes, no GPU
#                                             # needed (checks the script, proves nothing)
#
# Steps, each under its own time limit, logs in OUT_DIR/<step>.log:
#   sync-probe   every layer of benchmarks/layers.py and every pattern site of
#                benchmarks/patterns.py: one training forward+backward on the GPU under
#                torch.cuda.set_sync_debug_mode("error") (after one untimed warm-up call), so
#                any host synchronisation in them fails its row (those two benchmarks have no
#                sync check of their own)
#   layers       benchmarks/layers.py --device cuda
#   patterns     benchmarks/patterns.py --device cuda
#   child        benchmarks/child_throughput.py --device cuda (its own sync check of the bare
#                loop's and train_child's steps and validation is on for CUDA), with a
#                channels_last row
#   search       autodropout search --space tiny --dataset synthetic, 4 trials at once,
#                --gpus-per-trial 0.25 (four trials share the GPU)
# and prints one table: step, status, seconds, headline. Exit status: 0 if every step passed.
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    SMOKE=1
    shift
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python}"
OUT_DIR="${1:-${OUT:-$(mktemp -d -t autodropout-gpu.XXXXXX)}}"
mkdir -p "$OUT_DIR" || exit 2
export RAY_USAGE_STATS_ENABLED=0 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if (( SMOKE )); then
    DEVICE=cpu GPUS=0 REPEATS=2 CHILD_ARGS=(--repeats 1 --epochs 1 --examples 128)
else
    DEVICE=cuda GPUS=0.25 REPEATS=10 CHILD_ARGS=(--repeats 3 --epochs 2 --extras channels_last)
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
    then
        echo "gpu.sh: no CUDA device: torch.cuda.is_available() is False (torch $("$PY" -c \
'import torch; print(torch.__version__)' 2>/dev/null || echo 'not importable')); these checks" \
             "need a GPU. Use --cpu-smoke to check the script on a CPU." >&2
        exit 2
    fi
    "$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
fi
echo "logs: $OUT_DIR"

ROWS=()
FAILED=0
SECONDS_TOTAL=0

# headlines: read a step's log on stdin, print one short line for the table
headline_last() { grep -v '^[[:space:]]*$' | tail -n 1; }
headline_targets() {  # rows of a Markdown table ending in PASS or MISS
    awk -F'|' '/(PASS|MISS) *\| *$/ {n++; if ($0 ~ /MISS/) m = m $2 "(" $(NF-3) "vs" $(NF-2) ");"}
               END {print n+0 " rows with a target; missed: " (m ? m : "none")}'
}
headline_child() {
    awk -F'|' '/^sync check/ {printf "sync check ok; "}
               /^\| (bare, no pattern|train_child, no pattern|train_child, pattern|bare, no pattern, channels_last) \|/ {
                   printf "%s:%s/s (%s vs bare); ", $2, $3, $5}'
}
headline_search() {
    local log; log=$(cat)
    printf '%s trials rewarded; ' "$(grep -cE '^ *[0-9]+\. reward' <<<"$log")"
    grep -m1 -E '^ *1\. reward' <<<"$log"
}

# step NAME LIMIT_S HEADLINE_FN -- COMMAND...: run COMMAND under LIMIT_S, log, keep a row
step() {
    local name="$1" limit="$2" headline="$3"
    shift 4
    local log="$OUT_DIR/$name.log" started status rc elapsed line
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    elapsed=$(( $(date +%s) - started ))
    SECONDS_TOTAL=$(( SECONDS_TOTAL + elapsed ))
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT (${limit} s)"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    line=$("$headline" <"$log" 2>/dev/null | tr '\n' ' ' | tr '|' '/' | cut -c1-160)
    if [[ $rc != 0 && -z "$line" ]]; then
        line=$(grep -v '^\s*$' "$log" | tail -n 1 | tr '|' '/' | cut -c1-160)
    fi
    ROWS+=("| $name | $status | $elapsed | ${line:-see log} |")
    echo "[$name] $status in ${elapsed} s"
}

read -r -d '' SYNC_PROBE <<'PYTHON'
"""One forward+backward of every benchmarked layer and pattern site, host syncs an error."""
import sys

import torch
from torch import nn

sys.path.insert(0, "benchmarks")
import layers as layer_bench  # noqa: E402
import patterns as pattern_bench  # noqa: E402

from autodropout.patterns import PatternDropout  # noqa: E402

device = torch.device(sys.argv[1])
cases = []
activation = torch.randn(layer_bench.SHAPE, device=device)
for row in layer_bench.family_rows():
    if row.make is not None:
        cases.append((f"layer {row.label} {row.note}".strip(), row.make, row.shape_input(activation)))
site, seq = pattern_bench.CONV_SITE, pattern_bench.SEQUENCE_SITE
for label, make, shape in [
    ("site conv share_c", lambda: PatternDropout(site), pattern_bench.CONV_SHAPE),
    ("site conv per-channel", lambda: PatternDropout({**site, "share_c": False}),
     pattern_bench.CONV_SHAPE),
    ("site sequence tokens", lambda: PatternDropout(seq, "sequence", "ffn_hidden"),
     pattern_bench.SEQUENCE_SHAPE),
    ("site sequence both", lambda: PatternDropout({**seq, "axis": "both"}, "sequence",
                                                  "ffn_hidden"), pattern_bench.SEQUENCE_SHAPE),
    ("site attention_probs", lambda: PatternDropout(
        {**seq, "share": False, "apply_to": ["attention_probs"]}, "sequence", "attention_probs"),
     pattern_bench.ATTENTION_SHAPE),
]:
    cases.append((label, make, torch.randn(shape, device=device)))

synced = 0
for label, make, x in cases:
    module = make().to(device).train()
    x = x.detach().requires_grad_()
    grad = torch.randn_like(module(x))  # warm-up call: lazy tables may sync once
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        module(x).backward(grad)
        verdict = "no sync"
    except RuntimeError as error:
        synced += 1
        verdict = f"SYNC: {str(error).splitlines()[0][:100]}"
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    print(f"{label}: {verdict}")
print(f"sync probe on {device}: {len(cases) - synced} of {len(cases)} forward+backward "
      f"without host synchronisation")
sys.exit(1 if synced else 0)
PYTHON

step sync-probe 45 headline_last -- "$PY" -c "$SYNC_PROBE" "$DEVICE"
step layers 75 headline_targets -- \
    "$PY" benchmarks/layers.py --device "$DEVICE" --repeats "$REPEATS" --warmup 2
step patterns 75 headline_targets -- \
    "$PY" benchmarks/patterns.py --device "$DEVICE" --repeats "$REPEATS"
step child 130 headline_child -- \
    "$PY" benchmarks/child_throughput.py --device "$DEVICE" "${CHILD_ARGS[@]}"
rm -rf "$OUT_DIR/exp" "$OUT_DIR/gpu.db"
step search 150 headline_search -- \
    "$PY" -m autodropout search --space tiny --dataset synthetic --trials 4 --concurrent 4 \
    --gpus-per-trial "$GPUS" --db "sqlite:///$OUT_DIR/gpu.db" --experiments-dir "$OUT_DIR/exp" \
    --quiet

echo
echo "| step | status | seconds | headline (full output: $OUT_DIR/<step>.log) |"
echo "| --- | --- | ---: | --- |"
printf '%s\n' "${ROWS[@]}"
echo "| total | $( ((FAILED)) && echo FAILED || echo ok ) | $SECONDS_TOTAL | device $DEVICE, load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null) |"
exit "$FAILED"
