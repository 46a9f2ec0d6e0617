#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one run, on one H100/H200-class GPU, in under
# 8 minutes, into ONE results file (markdown: each step's command, status and printed tables, under
# a header with the machine, the date and the total time).
#
#   bash benchmarks/gpu.sh [DATA_DIR] [OUT_FILE]
#
# DATA_DIR  a folder with two CIFAR-10 shards, train_0.npz and test.npz (default .data/cifar10);
#           the sampling and precision steps need it, the others make their own random data.
# OUT_FILE  default $OUT/gpu_results.md when $OUT is set, else benchmarks/gpu_results.md. Rewritten
#           after every step, so a run cut short still leaves the steps it finished.
#
# Environment: PYTHON (default: the checkout's .venv when no virtualenv is active, else python),
# GPU_SH_DEVICE (default cuda; cpu runs a smoke test on the CPU, with twice the budgets), QUICK=1
# (the smallest sizes: every step in seconds, to check that each command runs; the default with
# GPU_SH_DEVICE=cpu). Each step runs under `timeout` with the budget written beside it (450 s in
# all, after a device check of at most 45 s); a step that fails or runs out of time is recorded
# and the next one starts. Without a CUDA device it prints one line and exits 2.
set -uo pipefail

START=$SECONDS
DATA_DIR=$(realpath -m "${1:-.data/cifar10}")
if [[ -n "${2:-}" ]]; then OUT_FILE=$(realpath -m "$2")
elif [[ -n "${OUT:-}" ]]; then OUT_FILE=$(realpath -m "$OUT/gpu_results.md")
else OUT_FILE=""; fi
cd "$(dirname "$0")/.." || exit 2
OUT_FILE=${OUT_FILE:-$PWD/benchmarks/gpu_results.md}
PY=${PYTHON:-}
[[ -z $PY && -z ${VIRTUAL_ENV:-} && -x .venv/bin/python ]] && PY=$PWD/.venv/bin/python
PY=${PY:-$(command -v python || command -v python3)}
DEV=${GPU_SH_DEVICE:-cuda}
if [[ $DEV == cpu ]]; then QUICK=${QUICK:-1}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
QUICK=${QUICK:-0}
SCALE=1; [[ $DEV == cpu ]] && SCALE=2  # the CPU smoke test gets twice the budgets: a shared CPU starts python slower
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg  # output reaches the log line by line, even from a killed step
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# --- the device, before anything else ---------------------------------------------------------------
MACHINE=$(timeout -k 5 45 "$PY" - "$DEV" <<'EOF'
import os, platform, sys
import torch
dev = sys.argv[1]
if dev.startswith("cuda") and not torch.cuda.is_available():
    print(f"gpu.sh: torch {torch.__version__} sees no CUDA device; run it on a GPU machine, "
          "or set GPU_SH_DEVICE=cpu for a smoke test", file=sys.stderr)
    sys.exit(2)
if dev.startswith("cuda"):
    p = torch.cuda.get_device_properties(torch.device(dev))
    gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
else:
    gpu = f"none (CPU smoke test: {platform.processor() or platform.machine()})"
versions = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
for name in ("torchvision", "timm"):
    try:
        versions.append(f"{name} {__import__(name).__version__}")
    except ImportError:
        versions.append(f"{name} not installed")
print(f"- device: {dev}: {gpu}")
print(f"- CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
print(f"- software: {', '.join(versions)}")
EOF
) 2>"$WORK/check" || {
    rc=$?
    if [[ $rc == 2 ]]; then tail -n 1 "$WORK/check" >&2
    else echo "gpu.sh: $PY cannot import torch (exit $rc: $(tail -n 1 "$WORK/check")); set PYTHON to the project's python" >&2; fi
    exit 2
}
echo "$MACHINE"
TRICKS=$(dirname "$PY")/tricks
[[ -x $TRICKS ]] || TRICKS=$(command -v tricks) || { echo "gpu.sh: no tricks command next to $PY or on PATH; install the project" >&2; exit 2; }

: >"$WORK/body.md"; : >"$WORK/rows.md"
mkdir -p "$(dirname "$OUT_FILE")"
HAVE_DATA=0
compgen -G "$DATA_DIR/train*.npz" >/dev/null && compgen -G "$DATA_DIR/test*.npz" >/dev/null && HAVE_DATA=1
DATA_SHOWN=$(realpath -m --relative-to="$PWD" "$DATA_DIR")
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && COMMIT+=" (with uncommitted changes)"
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')
BUDGET_TOTAL=0 N_OK=0 N_BAD=0

write_results() {  # the whole file, rewritten atomically after every step
    local tmp="$OUT_FILE.tmp.$$"
    {
        echo "# GPU benchmark results"
        echo
        echo "- date: $STARTED"
        echo "$MACHINE"
        echo "- commit: $COMMIT"
        echo "- sizes: $([[ $QUICK == 1 ]] && echo "QUICK (smallest sizes: checks that each command runs; the timings mean nothing)" || echo "full")$([[ $SCALE != 1 ]] && echo "; budgets x$SCALE on the CPU")"
        echo "- data: $DATA_SHOWN: $(if [[ $HAVE_DATA == 1 ]]; then (cd "$DATA_DIR" && ls -1 ./*.npz | sed 's|^\./||' | paste -sd ' ' -); else echo "none (no train*.npz and test*.npz in DATA_DIR)"; fi)"
        echo "- total: $((SECONDS - START)) s$1; budgets of the steps so far: $BUDGET_TOTAL s; $N_OK ok, $N_BAD failed or timed out"
        echo
        echo "| step | budget s | took s | status |"
        echo "| --- | --- | --- | --- |"
        cat "$WORK/rows.md"
        echo
        cat "$WORK/body.md"
    } >"$tmp" && mv -f "$tmp" "$OUT_FILE"
}

step() {  # step NAME BUDGET_S COMMAND... : run it under timeout, record command, status and output
    local name=$1 budget=$(($2 * SCALE)); shift 2
    local shown=("$@") began=$SECONDS rc status i
    [[ ${shown[0]} == "$PY" ]] && shown[0]=python
    [[ ${shown[0]} == "$TRICKS" ]] && shown[0]=tricks
    for i in "${!shown[@]}"; do shown[i]=${shown[i]//"$DATA_DIR"/$DATA_SHOWN}; shown[i]=${shown[i]//"$WORK"/'$WORK'}; done
    BUDGET_TOTAL=$((BUDGET_TOTAL + budget))
    printf '%-34s budget %4s s ... ' "$name" "$budget"
    timeout -k 10 "$budget" "$@" >"$WORK/log" 2>&1
    rc=$?
    case $rc in
        0) status=ok; N_OK=$((N_OK + 1)) ;;
        124|137) status="timed out after $budget s"; N_BAD=$((N_BAD + 1)) ;;
        *) status="failed (exit $rc)"; N_BAD=$((N_BAD + 1)) ;;
    esac
    echo "$status, $((SECONDS - began)) s"
    echo "| $name | $budget | $((SECONDS - began)) | $status |" >>"$WORK/rows.md"
    {
        echo "## $name"
        echo
        echo "budget $budget s, took $((SECONDS - began)) s: $status"
        echo
        echo '```'
        echo "${shown[*]}$([[ ${shown[1]:-} == - ]] && echo "   # the script inside benchmarks/gpu.sh")"
        echo '```'
        echo
        echo '```text'
        cat "$WORK/log"
        echo '```'
        echo
    } >>"$WORK/body.md"
    write_results " (running)"
}

skip() {  # skip NAME REASON
    echo "$1: skipped, $2"
    echo "| $1 | | | skipped: $2 |" >>"$WORK/rows.md"
    N_BAD=$((N_BAD + 1))
    write_results " (running)"
}

# --- the measurements: full sizes (GPU, budgets sum to 450 s) or QUICK sizes ---------------------
if [[ $QUICK == 1 ]]; then
    threads=(); [[ $DEV == cpu ]] && threads=(--threads 1)
    OVERHEAD=(--model resnet8 --batch-size 16 --steps 2 --repeats 1 "${threads[@]}")
    AUGMENT=(--sizes 32,224 --batch-size 4,2 --repeats 2 --step-repeats 1 --warmup 1 "${threads[@]}")
    DROPBLOCK=(--repeats 1 --model resnet8 --quick); MIXUP=(--repeats 2); KD=(--repeats 1 --quick)
    SAMPLE=(--space regnetx --flops 2M:8M --n 2 --per-gpu 2 --batch-size 16 --train-limit 32 --val-limit 32)
    RUN=(--model resnet8 --epochs 1 --batch-size 16 --train-limit 32 --val-limit 32 --plugins cosine)
else
    OVERHEAD=(--model resnet20 --batch-size 256 --steps 50 --repeats 5)
    AUGMENT=()  # its defaults: 32x32 and 224x224 at batch 256, ResNet-20 and ResNet-50 steps
    DROPBLOCK=(--repeats 20); MIXUP=(--repeats 200); KD=(--repeats 50)
    SAMPLE=(--n 16 --per-gpu 4 --epochs 1)
    RUN=(--model resnet20 --epochs 10 --batch-size 256 --plugins cosine)
fi

echo "results: $OUT_FILE"
write_results " (running)"
step "core overhead (overhead.py)" 65 "$PY" benchmarks/overhead.py --device "$DEV" "${OVERHEAD[@]}"
step "augmentation cost vs timm (augment_cost.py)" 75 "$PY" benchmarks/augment_cost.py --device "$DEV" "${AUGMENT[@]}"
step "dropblock cost (dropblock_cost.py)" 30 "$PY" plugins/dropblock/benchmarks/dropblock_cost.py --device "$DEV" "${DROPBLOCK[@]}"
step "mixup on_batch cost (on_batch_cost.py)" 15 "$PY" plugins/mixup/benchmarks/on_batch_cost.py --device "$DEV" "${MIXUP[@]}"
step "kd step cost (step_cost.py)" 15 "$PY" plugins/kd/benchmarks/step_cost.py --device "$DEV" "${KD[@]}"
# The divergence check queued on the device: --lr 1e6 must stop at an early step, exit 3, one line.
step "divergence stops the run (exit 3)" 20 bash -c '"$0" run --device "$1" --lr 1e6 --epochs 1 --model resnet8 \
    --out "$2/diverge" --quiet; code=$?; cat "$2/diverge/summary.json"; [[ $code == 3 ]]' "$TRICKS" "$DEV" "$WORK"
if [[ $HAVE_DATA == 1 ]]; then
    step "per-gpu packing (sample_throughput.py)" 130 "$PY" benchmarks/sample_throughput.py --dataset npz \
        --data-dir "$DATA_DIR" --device "$DEV" "${SAMPLE[@]}"
    for p in fp32 bf16 fp16; do
        step "training run, $p (tricks run)" 30 "$TRICKS" run --precision "$p" --device "$DEV" --dataset npz \
            --data-dir "$DATA_DIR" "${RUN[@]}" --seed 0 --json --out "$WORK/run-$p"
    done
    step "precision: bf16, fp16 against fp32" 10 "$PY" - "$WORK" <<'EOF'
"""Images per second (median over the epochs after the first, which warms up) and final accuracy
of each precision's run, against fp32's."""
import json, statistics, sys
from pathlib import Path

rows = {}
for p in ("fp32", "bf16", "fp16"):
    metrics = Path(sys.argv[1], f"run-{p}", "metrics.jsonl")
    if metrics.exists():
        epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if epochs:
            speed = statistics.median(e["images_per_second"] for e in (epochs[1:] or epochs))
            rows[p] = (speed, epochs[-1].get("val_acc"), len(epochs))
print("| precision | epochs | images/s (median, epochs 2+) | speed vs fp32 | final val acc | vs fp32, points |")
print("| --- | --- | --- | --- | --- | --- |")
base = rows.get("fp32")
for p in ("fp32", "bf16", "fp16"):
    if p not in rows:
        print(f"| {p} | no metrics (the run failed: see its step) | | | | |")
        continue
    speed, acc, n = rows[p]
    vs = f"{speed / base[0]:.2f}x" if base else ""
    gap = f"{100 * (acc - base[1]):+.2f}" if base and acc is not None and base[1] is not None else ""
    print(f"| {p} | {n} | {speed:,.0f} | {vs} | {100 * acc:.2f}% | {gap} |" if acc is not None else f"| {p} | {n} | {speed:,.0f} | {vs} | | |")
EOF
else
    reason="no train*.npz and test*.npz in DATA_DIR (copy two CIFAR-10 shards there, see benchmarks/README.md)"
    skip "per-gpu packing (sample_throughput.py)" "$reason"
    skip "training runs, fp32/bf16/fp16 (tricks run)" "$reason"
fi
write_results ""
echo "done in $((SECONDS - START)) s: $N_OK ok, $N_BAD failed, timed out or skipped; results in $OUT_FILE"
