"""The trace writer's share of a training step, side by side with tracing off, in one run.

    .venv/bin/python benchmarks/trace_overhead.py [--steps 60] [--rounds 2]

Trains the CPU positive control (configs/default.yaml, the bootstrapped tiny model; built first if
missing) for ``--steps`` steps with traces on and off, alternating, ``--rounds`` times each, and reports:
- the median step time of each (``step_time`` from metrics.jsonl, steps 3.. to skip warm-up) and their
  ratio: a noisy machine moves both, the ratio less;
- the recorder's own time per step (``traces/write_s``, measured inside the trainer around decoding,
  parsing, reward recomputation and ``write_step``) as a share of the step: the direct number.
Prints a markdown table to paste into benchmarks/traces.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(runs: Path, name: str, steps: int, traces: bool) -> list[dict]:
    overrides = [f"name={name}", f"runs_dir={runs}", f"training.max_steps={steps}", f"traces.enabled={str(traces).lower()}",
                 "checkpoints.save_every=1000000", "checkpoints.save_on_best=false", "checkpoints.reward_threshold=2",
                 "training.report_to=[]"]  # fmt: skip
    subprocess.run([sys.executable, "-m", "rlarith.cli", "train", "-c", "configs/default.yaml", *overrides], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    lines = (runs / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step_time" in r and r["step"] >= 3]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (REPO / "runs" / "bootstrap" / "model" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "rlarith.cli", "bootstrap"], cwd=REPO, check=True)
    step_on: list[float] = []
    step_off: list[float] = []
    write: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for traces in (True, False) if r % 2 == 0 else (False, True):
                rows = train(Path(tmp), f"{'on' if traces else 'off'}{r}", args.steps, traces)
                (step_on if traces else step_off).extend(x["step_time"] for x in rows)
                if traces:
                    write.extend(x["traces/write_s"] / x["step_time"] for x in rows)
    on, off = statistics.median(step_on), statistics.median(step_off)
    print("| measure | traces off | traces on | ratio on/off |\n|---|---|---|---|")
    print(
        f"| median step time, s ({len(step_off)} / {len(step_on)} steps) | {off:.4f} | {on:.4f} | {on / off:.3f} |"
    )
    print(
        f"| recorder time / step time, median (max) | - | {statistics.median(write):.2%} ({max(write):.2%}) | - |"
    )


if __name__ == "__main__":
    main()
