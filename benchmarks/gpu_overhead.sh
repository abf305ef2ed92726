#!/usr/bin/env bash
# One-shot GPU benchmark: the per-step cost of rlarith's trainer against bare TRL GRPOTrainer, and the trace
# recorder's share, on the gpu-baseline workload shape (shared/notes/gpu-baseline.md), side by side on one GPU.
#
#   bash benchmarks/gpu_overhead.sh       # from the repo root; results in $OUT (results.md, log.txt, env.txt)
#
# Model: a Qwen2.5-0.5B-shaped Llama with random weights and rlarith's character tokenizer (103 ids; the
# model keeps Qwen's 151,936-row vocabulary on purpose), built into $M. Random weights never emit EOS, so every
# completion is max_completion_length (8) tokens. Workload (all runs): configs/positive_control.yaml's task
# (3-digit x 2-digit multiplication) and prompt, PROMPTS prompts x 8 generations per step, bf16 autocast over
# float32 weights, beta 0, loss dapo, lr 1e-6 constant, STEPS steps, seed 0, no gradient checkpointing.
# Runs, each its own process, in this order:
#   a  bare TRL GRPOTrainer (benchmarks/gpu_overhead.py bare: rlarith's GRPOConfig, reward exact, no callbacks)
#   b  rlarith train, traces.enabled=false
#   c  rlarith train, traces on
#   a2 bare TRL again (drift)
# The table: medians of steps 3..STEPS-1 (rlarith saves a checkpoint at the final step) of TRL's `step_time`
# and of the wall time between metrics.jsonl lines, ratios against a, and traces/write_s / step_time for c.
#
# Wheels as in gpu_check.sh. Every command runs under `timeout` (at most 150 s, never past BUDGET seconds from
# the start); a failure never stops the script.
#
# Environment (defaults): OUT (/tmp/overhead_out), PY (python3), DTYPE (bfloat16), SHAPE (full | tiny), STEPS
# (25), PROMPTS (32), BUDGET (400 s), SKIP_WHEELS (0; 1 uses PY's own packages).
# On CPU, benchmarks/step_overhead.py is the better tool (runs alternated, medians with spread). This script
# still runs there (~9 min on 2 busy cores): PY=.venv/bin/python DTYPE=float32 SHAPE=tiny STEPS=5 PROMPTS=4 \
#     SKIP_WHEELS=1 BUDGET=1500 OUT=/tmp/overhead_out bash benchmarks/gpu_overhead.sh

OUT=${OUT:-/tmp/overhead_out}
PY=${PY:-python3}
DTYPE=${DTYPE:-bfloat16}
SHAPE=${SHAPE:-full}
STEPS=${STEPS:-25}
PROMPTS=${PROMPTS:-32}
BUDGET=${BUDGET:-400}
M=/tmp/m05
RUNS=/tmp/bench
T0=$(date +%s)
mkdir -p "$OUT"

left() { echo $((BUDGET - ($(date +%s) - T0))); }

# step NAME CMD...: CMD under timeout (150 s or what is left of BUDGET), then `STATUS NAME CODE`.
step() {
    local name=$1 t rc s
    shift
    t=$(left)
    ((t > 150)) && t=150
    if ((t < 15)); then
        echo "STATUS $name SKIPPED (budget spent)"
        SUMMARY+="STATUS $name SKIPPED"$'\n'
        return 0
    fi
    echo "=== $name: $* (timeout ${t}s, $(date -u +%FT%TZ))"
    s=$(date +%s)
    timeout -k 10 "$t" "$@"
    rc=$?
    echo "STATUS $name $rc ($(($(date +%s) - s)) s)"
    SUMMARY+="STATUS $name $rc ($(($(date +%s) - s)) s)"$'\n'
    return 0
}

# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"

main() {
    SUMMARY=""
    echo "gpu_overhead: OUT=$OUT PY=$PY DTYPE=$DTYPE SHAPE=$SHAPE STEPS=$STEPS PROMPTS=$PROMPTS BUDGET=${BUDGET}s" \
        "SKIP_WHEELS=${SKIP_WHEELS:-0}"
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf_home
    unset SCRATCH # traces beside the run: $RUNS/<name>/traces
    install_wheels

    {
        date -u +%FT%TZ
        nvidia-smi -L 2>&1
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
        echo "nproc $(nproc)"
        timeout 120 "$PY" - <<'EOF' 2>&1
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "trl", "accelerate", "datasets", "huggingface_hub", "tokenizers",
             "safetensors", "numpy", "h5py", "zstandard", "omegaconf", "rlarith"):
    try:
        mod = importlib.import_module(name)
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            version = getattr(mod, "__version__", "?")
        print(f"{name:18s} {version:22s} {getattr(mod, '__file__', '')}")
    except Exception as err:
        print(f"{name:18s} IMPORT FAILED: {type(err).__name__}: {err}")
import torch
print("cuda available", torch.cuda.is_available(), "torch cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
EOF
    } >"$OUT/env.txt"
    cat "$OUT/env.txt"

    rm -rf "$M" "$RUNS"
    mkdir -p "$RUNS"
    step build "$PY" benchmarks/gpu_overhead.py build --out "$M" --shape "$SHAPE"

    local rl=("$PY" -m rlarith.cli train -c configs/positive_control.yaml "runs_dir=$RUNS" "model.path=$M"
        "model.dtype=$DTYPE" "training.max_steps=$STEPS" "training.prompts_per_step=$PROMPTS"
        training.num_generations=8 training.max_completion_length=8 training.learning_rate=1e-6
        training.deepspeed=none "training.report_to=[]" checkpoints.save_every=1000
        checkpoints.save_on_best=false checkpoints.reward_threshold=2)
    local bare=("$PY" benchmarks/gpu_overhead.py bare --model "$M" --steps "$STEPS" --prompts "$PROMPTS"
        --dtype "$DTYPE")

    step a_bare "${bare[@]}" --out "$RUNS/bare"
    step b_rlarith_notrace "${rl[@]}" name=notrace traces.enabled=false
    step c_rlarith_trace "${rl[@]}" name=trace
    step a2_bare "${bare[@]}" --out "$RUNS/bare2"
    du -sh "$RUNS"/trace/traces 2>/dev/null

    for r in bare notrace trace bare2; do cp "$RUNS/$r/metrics.jsonl" "$OUT/metrics_$r.jsonl" 2>/dev/null; done
    echo "=== results ($(($(date +%s) - T0)) s)"
    timeout 60 "$PY" benchmarks/gpu_overhead.py report --steps "$STEPS" --completions $((PROMPTS * 8)) \
        --out "$OUT/results.md" "a=$RUNS/bare/metrics.jsonl" "b=$RUNS/notrace/metrics.jsonl" \
        "c=$RUNS/trace/metrics.jsonl" "a2=$RUNS/bare2/metrics.jsonl"
    echo "STATUS report $?"
    {
        echo
        echo "Device: $(nvidia-smi -L 2>/dev/null | head -n 1)"
        echo "SHAPE=$SHAPE DTYPE=$DTYPE STEPS=$STEPS PROMPTS=$PROMPTS"
        echo
        printf '%s' "$SUMMARY"
    } >>"$OUT/results.md"
    echo "=== summary ($(($(date +%s) - T0)) s)"
    printf '%s' "$SUMMARY"
    ls -la "$OUT"
}

main 2>&1 | tee "$OUT/log.txt"
