"""Resume latency on CPU: from process start to the first new step after a resume, split into its phases.

    .venv/bin/python benchmarks/resume_latency.py [--shape tiny|100m] [--rounds 2] [--prompts 2]

Each round trains one step from the model in a fresh run directory (``rlarith train``, saved and sealed at
its final step), then resumes it in a new process to take one more step: the first gives the latency of a
fresh start, the second of a resume, on the same machine, back to back. The phases are read from the run's
own records, timed against the moment the benchmark started the process:
- start -> attempt record: Python, rlarith's imports (no torch yet), config, preflight checks, the run
  lock, and on resume ``verify`` of the checkpoint (its own seconds are in the log line, shown apart);
- -> "run ..." log line: torch/transformers/TRL imports, model load, the trainer built;
- -> first step's metrics line, minus that step's ``step_time``: the Trainer's start, and on resume its
  load of the checkpoint (weights, optimizer, scheduler, RNG, trainer state);
- the first step's ``step_time`` (TRL's, inside ``training_step``).
"imports alone" is a separate process importing torch, transformers and TRL's GRPOTrainer, for scale.
Models: rlarith.tinymodel's tiny Llama (~1M parameters) or the ~110M Llama of checkpoint_save.py (random
weights, float32). Written to benchmarks/results/resume_latency_<shape>.md with the machine, versions, date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchenv import REPO, set_threads, write_results
from gpu_overhead import WORKLOAD

PHASES = ("start -> attempt record", "of which verify", "-> model loaded, trainer built",
          "-> first step begins (checkpoint load)", "first step (step_time)", "start -> first new step")  # fmt: skip


def build(shape: str, out: Path) -> Path:
    if shape == "tiny":
        from rlarith.tinymodel import init_model

        return init_model(out)
    from checkpoint_save import build_model

    from rlarith.tinymodel import build_tokenizer

    build_model().save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def train(runs: Path, name: str, model: Path, steps: int, prompts: int) -> dict[str, float]:
    """One ``rlarith train`` process; its phases in seconds."""
    cmd = [sys.executable, "-m", "rlarith.cli", "train", "-c", "configs/positive_control.yaml",
           f"runs_dir={runs}", f"name={name}", f"model.path={model}", "model.dtype=float32",
           f"training.max_steps={steps}", f"training.prompts_per_step={prompts}", *WORKLOAD,
           "checkpoints.save_on_best=false", "checkpoints.reward_threshold=2"]  # fmt: skip
    started = time.time()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    run_dir = runs / name
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    attempt = [r for r in records if r.get("event") == "attempt"][-1]
    first = [r for r in records if "step_time" in r and r["step"] == attempt["resumed_from"] + 1][-1]
    built = verify = None
    for line in (run_dir / "logs" / "rank0.log").read_text().splitlines():
        stamp, _, text = line.partition(" step ")
        if "| verified checkpoint-" in text:
            verify = float(text.rsplit(" in ", 1)[1].split()[0])
        if "| run " in text and attempt["attempt"] in text:
            built = seconds(stamp)
    t_attempt, t_first = seconds(attempt["time"]), seconds(first["time"])
    return {
        PHASES[0]: t_attempt - started,
        PHASES[1]: verify or 0.0,
        PHASES[2]: built - t_attempt,
        PHASES[3]: t_first - first["step_time"] - built,
        PHASES[4]: first["step_time"],
        PHASES[5]: t_first - started,
    }


def imports() -> float:
    started = time.time()
    code = "import torch, transformers; from trl import GRPOTrainer"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    return time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["tiny", "100m"], default="tiny")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (x 8 completions)")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (benchenv.set_threads)")
    args = parser.parse_args()
    set_threads(args.threads)
    fresh: list[dict[str, float]] = []
    resumed: list[dict[str, float]] = []
    alone: list[float] = []
    with tempfile.TemporaryDirectory(prefix="resume-latency-") as tmp:
        model = build(args.shape, Path(tmp) / "model")
        size = sum(p.stat().st_size for p in model.iterdir())
        for r in range(args.rounds):
            alone.append(imports())
            fresh.append(train(Path(tmp), f"r{r}", model, 1, args.prompts))
            resumed.append(train(Path(tmp), f"r{r}", model, 2, args.prompts))
            print(f"round {r}: fresh {fresh[-1][PHASES[5]]:.1f} s, resume {resumed[-1][PHASES[5]]:.1f} s, "
                  f"imports alone {alone[-1]:.1f} s", flush=True)  # fmt: skip
        ckpt = Path(tmp) / "r0" / "checkpoints" / "checkpoint-1"
        ckpt_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) if ckpt.is_dir() else 0

    med = statistics.median

    def cell(rows: list[dict[str, float]], key: str) -> str:
        xs = [row[key] for row in rows]
        return f"{med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    lines = [
        f"Model: {args.shape} ({size / 2**20:.0f} MiB of model files; checkpoint {ckpt_bytes / 2**20:.0f} MiB with "
        f"AdamW state), float32, positive_control.yaml's task, {args.prompts} prompts x 8 completions per step. "
        f"{args.rounds} rounds (fresh start of a new run, then its resume, back to back); seconds, median (min-max).",
        "",
        "| phase | fresh start (step 1) | resume from checkpoint-1 (step 2) |",
        "|---|---|---|",
        *(f"| {p} | {cell(fresh, p)} | {cell(resumed, p)} |" for p in PHASES),
        "",
        f"Imports alone (torch, transformers, trl.GRPOTrainer; a separate process): {med(alone):.2f} s "
        f"({min(alone):.2f}-{max(alone):.2f}). Resume minus fresh, start to first new step: "
        f"{med(r[PHASES[5]] for r in resumed) - med(f[PHASES[5]] for f in fresh):+.2f} s.",
    ]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    out = args.out or REPO / "benchmarks" / "results" / f"resume_latency_{args.shape}.md"
    print(f"written to {write_results(out, 'Resume latency on CPU (start to first new step)', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
