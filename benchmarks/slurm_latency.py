"""Preemption on the one-node test cluster: how long from SLURM's signal to a saved exit, and from the
requeue to the first new training step. Writes benchmarks/slurm_latency.md.

    slurm/testcluster.sh start && eval "$(slurm/testcluster.sh env)"
    .venv/bin/python benchmarks/slurm_latency.py --repeats 3

Each repeat submits a 40-step run of the tiny model (random weights: speed does not depend on them) to the
``low`` partition with ``rlarith submit``, waits for step 3, submits a job to ``high`` that needs the whole
node, and reads the times from the run's attempts.jsonl and metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlarith import attempts  # noqa: E402


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def rlarith(*args: str, **kw: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "rlarith.cli", *args], env=env, text=True, **kw)  # type: ignore[call-overload]


def one(model: Path, root: Path, name: str) -> dict[str, float]:
    run_dir = root / name
    args = ["-c", str(REPO / "configs/default.yaml"), f"name={name}", f"runs_dir={root}", f"model.path={model}",
            "training.max_steps=40", "training.prompts_per_step=4", "training.num_generations=4",
            "training.max_completion_length=5", "training.report_to=[]", "checkpoints.save_every=10",
            "slurm.executor=slurm", "slurm.partition=low", "slurm.cpus_per_task=1", "slurm.mem_gb=1",
            f"slurm.logs_dir={root / 'submitit'}"]  # fmt: skip
    waiter = subprocess.Popen(
        [sys.executable, "-m", "rlarith.cli", "submit", "--wait", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3):
        time.sleep(0.05)
    preempted_at = time.time()
    nodes = os.environ.get("RLARITH_SLURM_NODES", "n1").split(",")  # a high job on every node preempts
    subprocess.run(["sbatch", "-p", "high", "-N", str(len(nodes)), "--exclusive", "--mem=1G", "-o", "/dev/null",
                    "--wrap", "sleep 1"], check=True, capture_output=True)  # fmt: skip
    assert waiter.wait(timeout=600) == 0, "the job did not finish"
    first, second = attempts.merged(run_dir)[:2]
    records = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    resumed = [r for r in records if seconds(r["time"]) > seconds(second["start"])]
    return {
        "preempt -> signal": seconds(first["signalled"]) - preempted_at,
        "signal -> saved exit": seconds(first["end"]) - seconds(first["signalled"]),
        "exit -> restart": seconds(second["start"]) - seconds(first["end"]),
        "restart -> first new step": seconds(resumed[0]["time"]) - seconds(second["start"]),
        "exit -> first new step (requeue latency)": seconds(resumed[0]["time"]) - seconds(first["end"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "slurm_latency.md"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="slurm-latency-"))
    rlarith("init-model", "--out", str(root / "model"), check=True, capture_output=True)
    runs = [one(root / "model", root, f"lat{i}") for i in range(args.repeats)]
    rows = [
        f"| {key} | {statistics.median(r[key] for r in runs):.1f} | "
        f"{min(r[key] for r in runs):.1f} - {max(r[key] for r in runs):.1f} |"
        for key in runs[0]
    ]
    load = os.getloadavg()[0]
    text = "\n".join([
        f"# Preemption latency on the test cluster ({datetime.now():%Y-%m-%d}, {platform.node()}, "
        f"{os.cpu_count()} cores, load {load:.1f}, {args.repeats} repeats)",
        "",
        "Command: `.venv/bin/python benchmarks/slurm_latency.py --repeats "
        f"{args.repeats}` against `slurm/testcluster.sh` (SLURM 22.05, GraceTime 15 s, sched_interval 2 s).",
        "",
        "| interval | median s | range s |",
        "|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
