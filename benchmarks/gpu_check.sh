#!/usr/bin/env bash
# One-shot GPU check of rlarith on one GPU: GRPO training in bf16 with a SIGTERM stop (exit 75) and an exact
# resume, DeepSpeed ZeRO-2 on one process, held-out evaluation (latest checkpoint, then every checkpoint with
# the plot) and the traces summary, on the tiny local model (no download, no network).
#
#   bash benchmarks/gpu_check.sh          # from the repo root; keeps its results under $OUT
#
# Wheels of what the GPU image lacks travel in .whl/ (git-ignored) and go to /tmp/site; the repo is used from
# source through PYTHONPATH. .whl/optional/ holds huggingface_hub and fsspec, installed only when the image's
# own version does not fit datasets/transformers. Every step prints `STATUS <name> <exit code>`; a failure
# never stops the script. Each command runs under `timeout` (at most 200 s, and never past BUDGET seconds
# from the start), so the whole check stays under the device's limit.
#
# The random tiny model never answers right, so every reward and advantage is 0 and GRPO computes no gradient:
# by default `rlarith bootstrap` first SFT-warms it (BOOTSTRAP_STEPS, 600) into $WORK/m_sft and the runs train
# that; BOOTSTRAP_STEPS=0 trains the bare `init-model` output ($WORK/m) instead.
#
# .whl/ is not in git; rebuild it on the dev machine (Python 3.12 wheels for the GPU image), then copy the
# deepspeed wheel pip built locally (find ~/.cache/pip/wheels -name 'deepspeed-0.19.8*.whl'):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 omegaconf==2.4.0 zstandard==0.25.0 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 hjson==3.1.0 \
#     einops==0.8.2 typing_extensions==4.16.0
#   pip download ... -d .whl/optional huggingface_hub==1.33.0 fsspec==2026.9.0
# Environment (defaults): OUT (/tmp/gpucheck_out), PY (python3), DTYPE (bfloat16), WORK (/tmp: models in
# $WORK/m and $WORK/m_sft, runs in $WORK/runs), BUDGET (420 s), BOOTSTRAP_STEPS (600), SKIP_WHEELS (0; 1 uses
# PY's own packages).
# On a CPU machine: PY=.venv/bin/python DTYPE=float32 SKIP_WHEELS=1 BUDGET=1500 bash benchmarks/gpu_check.sh

OUT=${OUT:-/tmp/gpucheck_out}
PY=${PY:-python3}
DTYPE=${DTYPE:-bfloat16}
WORK=${WORK:-/tmp}
BUDGET=${BUDGET:-420}
BOOTSTRAP_STEPS=${BOOTSTRAP_STEPS:-600}
M=$WORK/m
RUNS=$WORK/runs
T0=$(date +%s)
mkdir -p "$OUT"

left() { echo $((BUDGET - ($(date +%s) - T0))); }

# step NAME CMD...: CMD under timeout (200 s or what is left of BUDGET), then `STATUS NAME CODE`.
step() {
    local name=$1 t rc s
    shift
    t=$(left)
    ((t > 200)) && t=200
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
    SUMMARY+="STATUS $name $rc"$'\n'
    return 0
}

metrics_report() { # steps and rewards of a run's metrics.jsonl: a resume must leave no gap and no repeat
    timeout 60 "$PY" - "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r["step"] for r in rows if "reward" in r]
print(f"{sys.argv[1]}: {len(rows)} lines, {len(steps)} step records, steps {steps[:1]}..{steps[-1:]}")
print("  repeated steps:", sorted({s for s in steps if steps.count(s) > 1}),
      " missing:", sorted(set(range(1, max(steps, default=0) + 1)) - set(steps)))
for r in rows:
    if "reward" in r:
        print(f"  step {r['step']:3d}  reward {r['reward']:.3f}  exact {r.get('rewards/exact/mean', float('nan')):.3f}"
              f"  loss {r.get('loss', float('nan')):.4f}  {r['time']}")
EOF
}

# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "$0")/gpu_common.sh"

main() {
    SUMMARY=""
    echo "gpu_check: OUT=$OUT PY=$PY DTYPE=$DTYPE WORK=$WORK BUDGET=${BUDGET}s SKIP_WHEELS=${SKIP_WHEELS:-0}"
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        TRANSFORMERS_OFFLINE=1 HF_HOME=$WORK/hf_home MASTER_PORT=29511
    unset SCRATCH # traces beside the run: $RUNS/<name>/traces
    install_wheels

    {
        date -u +%FT%TZ
        nvidia-smi -L 2>&1
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
        timeout 120 "$PY" - <<'EOF' 2>&1
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "trl", "deepspeed", "accelerate", "datasets", "huggingface_hub", "fsspec",
             "pyarrow", "pandas", "numpy", "tokenizers", "safetensors", "pydantic", "typing_extensions", "jinja2",
             "omegaconf", "zstandard", "h5py", "matplotlib", "tensorboard", "rlarith"):
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
    set -x

    rm -rf "$M" "$M"_sft "$M"_sft.bootstrap "$RUNS"
    step init_model "$PY" -m rlarith.cli init-model --out "$M"
    if ((BOOTSTRAP_STEPS > 0)); then # SFT warm start: GRPO needs groups whose rewards differ
        step bootstrap "$PY" -m rlarith.cli bootstrap -c configs/default.yaml --steps "$BOOTSTRAP_STEPS" --out "$M"_sft
        if [ -f "$M"_sft/config.json ]; then M=$M"_sft"; else echo "WARNING: no bootstrapped model; training $M"; fi
    fi

    # (a) GRPO, one process: SIGTERM once metrics.jsonl has 12 lines (expect 75), then resume to step 30 (expect 0)
    local train=("$PY" -m rlarith.cli train -c configs/default.yaml name=gpu "runs_dir=$RUNS" "model.path=$M"
        "model.dtype=$DTYPE" training.max_steps=30 checkpoints.save_every=10 rewards.weights.partial=1.0
        rewards.weights.format=0.5)
    local t n=0 pid rc
    t=$(left)
    ((t > 200)) && t=200
    echo "=== train_sigterm: ${train[*]} (timeout ${t}s, $(date -u +%FT%TZ))"
    timeout -k 60 "$t" "${train[@]}" & # -k: timeout KILLs this long after forwarding our TERM
    pid=$!
    set +x
    while kill -0 "$pid" 2>/dev/null; do
        n=$(cat "$RUNS/gpu/metrics.jsonl" 2>/dev/null | wc -l)
        ((n >= 12)) && break
        sleep 0.2
    done
    set -x
    if kill -0 "$pid" 2>/dev/null; then
        echo "sending SIGTERM at $n metrics lines"
        kill -TERM "$pid"
    else
        echo "WARNING: the run ended before the signal ($n metrics lines): the stop was not exercised"
    fi
    wait "$pid"
    rc=$?
    echo "STATUS train_sigterm $rc (expect 75)"
    SUMMARY+="STATUS train_sigterm $rc"$'\n'
    ls "$RUNS/gpu/checkpoints"
    step train_resume "${train[@]}"
    ls "$RUNS/gpu/checkpoints"
    metrics_report "$RUNS/gpu/metrics.jsonl"
    cp "$RUNS/gpu/metrics.jsonl" "$OUT/metrics_gpu.jsonl"

    # (b) DeepSpeed ZeRO-2, one process (rlarith sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR; MASTER_PORT above)
    step train_zero2 "${train[@]}" name=gpu_ds training.max_steps=20 training.deepspeed=zero2
    ls "$RUNS/gpu_ds/checkpoints" "$RUNS"/gpu_ds/checkpoints/checkpoint-*
    metrics_report "$RUNS/gpu_ds/metrics.jsonl"
    cp "$RUNS/gpu_ds/metrics.jsonl" "$OUT/metrics_gpu_ds.jsonl"

    # (c) held-out evaluation: latest checkpoint (copied before --all-checkpoints rewrites it with n=100)
    step eval_latest "$PY" -m rlarith.cli eval "$RUNS/gpu" --n 200
    local latest
    latest=$(ls -t "$RUNS"/gpu/eval/val-step*.json 2>/dev/null | head -n 1)
    [ -n "$latest" ] && cp "$latest" "${latest%.json}.md" "$OUT/"
    step eval_all "$PY" -m rlarith.cli eval "$RUNS/gpu" --all-checkpoints --n 100
    cp "$RUNS/gpu/eval/val-over-steps.md" "$RUNS/gpu/eval/accuracy_over_steps.png" "$OUT/"

    # (d) traces
    step traces_summary "$PY" -m rlarith.cli traces summary "$RUNS/gpu"

    set +x
    echo "=== summary ($(($(date +%s) - T0)) s)"
    printf '%s' "$SUMMARY"
    ls -la "$OUT"
}

main 2>&1 | tee "$OUT/log.txt"
