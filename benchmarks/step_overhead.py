"""rlarith's step time against bare TRL GRPOTrainer on CPU, the two alternated in one call (A B A B ...).

    .venv/bin/python benchmarks/step_overhead.py [--shape tiny] [--rounds 3] [--steps 12] [--prompts 4]

The CPU counterpart of benchmarks/gpu_overhead.sh, with its workload (configs/positive_control.yaml's task
and prompt, PROMPTS prompts x 8 completions of at most 8 tokens, lr 1e-6, float32, no DeepSpeed) and its
bare baseline (gpu_overhead.bare_trainer: rlarith's GRPOConfig, dataset and reward functions, no rlarith
callbacks, subclass or traces). Each run is its own process:
  A  bare TRL GRPOTrainer (``gpu_overhead.py bare``)
  B  ``rlarith train`` as users run it (traces on; no save before the final step, which is not counted)
The model: rlarith.tinymodel's tiny Llama (``--shape tiny``, ~1M parameters, the CPU positive control's
shape; random weights) or a wider one (``--shape small``, hidden 256 x 6 layers, ~6M).

The table: per variant, the median of every step's time pooled over its runs (steps 3..STEPS-1: warm-up
and the final save left out) with its interquartile range, and the min/max of the per-run medians; then the
ratio B/A of the pooled medians and of each round's pair (a pair runs back to back, so a busy neighbour
moves both alike). ``step_time`` is TRL's own (inside ``training_step``); wall is the gap between
consecutive metrics.jsonl lines (everything: callbacks, optimizer, logging). Written to
benchmarks/results/step_overhead_<shape>.md with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import REPO, set_threads, write_results
from gpu_overhead import WORKLOAD, step_series

SHORT = 2  # steps of the short run whose CPU time is subtracted (start-up, imports, model load, final save)
SHAPES = {"tiny": {"hidden": 128, "layers": 4, "heads": 4}, "small": {"hidden": 256, "layers": 6, "heads": 4}}


def run(variant: str, model: Path, out: Path, steps: int, prompts: int) -> tuple[float, float]:
    """One run in its own process; returns its wall and CPU (user + system) seconds, start to exit."""
    if variant == "bare":
        cmd = [sys.executable, "benchmarks/gpu_overhead.py", "bare", "--model", str(model), "--out", str(out),
               "--steps", str(steps), "--prompts", str(prompts), "--dtype", "float32"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "rlarith.cli", "train", "-c", "configs/positive_control.yaml",
               f"runs_dir={out.parent}", f"name={out.name}", f"model.path={model}", "model.dtype=float32",
               f"training.max_steps={steps}", f"training.prompts_per_step={prompts}", *WORKLOAD,
               "checkpoints.save_every=1000000", "checkpoints.save_on_best=false",
               "checkpoints.reward_threshold=2"]  # fmt: skip
    started, cpu = time.time(), _children_cpu()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant} run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.time() - started, _children_cpu() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def table(series: dict[str, list[dict[str, list[float]]]], metric: str) -> list[str]:
    labels = {"bare": "A: bare TRL GRPOTrainer", "rlarith": "B: rlarith train (traces on)"}
    lines = []
    for variant, runs in series.items():
        pooled = [x for r in runs for x in r[metric]]
        q1, q2, q3 = quartiles(pooled)
        per_run = [statistics.median(r[metric]) for r in runs]
        lines.append(
            f"| {labels[variant]} | {metric} | {len(runs)} x {len(runs[0][metric])} | {q2:.4f} "
            f"| {q1:.4f}-{q3:.4f} ({(q3 - q1) / q2:.0%}) | {min(per_run):.4f}-{max(per_run):.4f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument(
        "--rounds", type=int, default=3, help="A B pairs, run back to back, alternating which goes first"
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (x 8 completions)")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (benchenv.set_threads)")
    args = parser.parse_args()
    set_threads(args.threads)
    from rlarith.tinymodel import init_model

    first, last = 3, args.steps - 1
    series: dict[str, list[dict[str, list[float]]]] = {"bare": [], "rlarith": []}
    walls: dict[str, list[float]] = {"bare": [], "rlarith": []}
    cpu: dict[str, list[float]] = {"bare": [], "rlarith": []}  # CPU s per step: long run minus short run
    with tempfile.TemporaryDirectory(prefix="step-overhead-") as tmp:
        model = init_model(Path(tmp) / "model", **SHAPES[args.shape])
        for r in range(args.rounds):
            for variant in ("bare", "rlarith") if r % 2 == 0 else ("rlarith", "bare"):  # neither always first
                out = Path(tmp) / f"{variant}{r}"
                wall, cpu_long = run(variant, model, out, args.steps, args.prompts)
                walls[variant].append(wall)
                _, cpu_short = run(variant, model, Path(tmp) / f"{variant}{r}short", SHORT, args.prompts)
                cpu[variant].append((cpu_long - cpu_short) / (args.steps - SHORT))
                series[variant].append(step_series(out / "metrics.jsonl", first, last))
                s = series[variant][-1]["step_time"]
                print(f"round {r} {variant}: median step_time {statistics.median(s):.4f} s", flush=True)
        import torch
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())

    med = statistics.median
    lines = [
        f"Model: rlarith.tinymodel Llama, shape {args.shape} {SHAPES[args.shape]}, {params / 1e6:.2f}M parameters, "
        f"random weights, float32, torch threads {torch.get_num_threads()}. Workload: positive_control.yaml's task, "
        f"{args.prompts} prompts x 8 completions (<= 8 tokens) per step, {args.steps} steps per run, "
        f"{args.rounds} rounds, A and B alternating which goes first (each run its own process). Statistics over steps {first}..{last}.",
        "",
        "| variant | metric | runs x steps | median s | IQR (IQR/median) | per-run medians min-max |",
        "|---|---|---|---|---|---|",
    ]
    for metric in ("step_time", "wall"):
        lines += table(series, metric)
    lines += [
        "",
        "| ratio B/A | pooled medians | per-round pairs: median (min-max) | goal |",
        "|---|---|---|---|",
    ]
    for metric in ("step_time", "wall"):
        a = [med(r[metric]) for r in series["bare"]]
        b = [med(r[metric]) for r in series["rlarith"]]
        pairs = [y / x for x, y in zip(a, b)]
        pooled = med([x for r in series["rlarith"] for x in r[metric]]) / med(
            [x for r in series["bare"] for x in r[metric]]
        )
        lines.append(
            f"| {metric} | {pooled:.3f} | {med(pairs):.3f} ({min(pairs):.3f}-{max(pairs):.3f}) | <= 1.02 |"
        )
    pairs = [y / x for x, y in zip(cpu["bare"], cpu["rlarith"])]
    lines.append(
        f"| CPU s per step (user + system; a {args.steps}-step run minus a {SHORT}-step one) "
        f"| {med(cpu['rlarith']) / med(cpu['bare']):.3f} | {med(pairs):.3f} ({min(pairs):.3f}-{max(pairs):.3f}) "
        f"| <= 1.02 |"
    )
    lines.append(
        f"\nCPU s per step, per run: A {', '.join(f'{x:.3f}' for x in cpu['bare'])}; "
        f"B {', '.join(f'{x:.3f}' for x in cpu['rlarith'])}. CPU time counts the work done, not the "
        "waiting, so it moves less with the machine's load than wall time does (the whole run, not only the "
        "steps 3.. of the other rows)."
    )
    share = [x for r in series["rlarith"] for x in r["share"]]
    if share:
        lines.append(
            f"\nB's trace recorder (traces/write_s / step_time): median {med(share):.2%}, max {max(share):.2%}."
        )
    lines.append(
        f"Process wall, start to exit (imports, model load, {args.steps} steps, B's final save): "
        f"A {med(walls['bare']):.1f} s, B {med(walls['rlarith']):.1f} s (medians)."
    )
    body = "\n".join(lines)
    print(body)
    out = args.out or REPO / "benchmarks" / "results" / f"step_overhead_{args.shape}.md"
    print(f"written to {write_results(out, 'rlarith vs bare TRL step time on CPU', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
