"""What making traces durable costs: ms per step of the trace writer under each fsync policy, side by side.

    .venv/bin/python benchmarks/trace_fsync.py [--steps 200] [--rounds 4] [--dir /path/on/the/disk/to/measure]

Policies, alternated round by round in one process (A B C D A B C D ...), each writing the same synthetic
records (benchmarks/traces_bench.py's: 64 samples per step) into a fresh folder:
- ``never``: no fsync of the journal at all (rlarith before traces.fsync_steps and checkpoint syncs);
- ``checkpoint/50`` and ``checkpoint/10``: ``TraceWriter.sync()`` every 50 or 10 steps, as the trainer does
  at each checkpoint save (``traces.fsync_steps=false``, the default; checkpoints.save_every=50 or 10);
- ``every step``: ``traces.fsync_steps=true``, one fsync per record.
Shards are sealed every ``traces.shard_steps`` (500, the default) and always fsynced, in every policy.
A step is ``write_step`` + ``write_metrics`` (+ ``sync`` on a checkpoint step). The figure is the disk's:
run it with ``--dir`` on the filesystem that holds your traces (tmpfs makes fsync free).
Writes benchmarks/results/trace_fsync.md (``--out``) with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchenv import REPO, write_results
from traces_bench import META, metrics_of, synth_step

from rlarith import traces
from rlarith.config import TraceConfig

POLICIES = {
    "never": (False, 0),
    "checkpoint/50": (False, 50),
    "checkpoint/10": (False, 10),
    "every step": (True, 0),
}


def one_pass(directory: Path, data: list[dict[str, list]], fsync_steps: bool, sync_every: int) -> list[float]:
    """ms per step of one writer under one policy; the folder is removed afterwards."""
    w = traces.TraceWriter(directory, cfg=TraceConfig(fsync_steps=fsync_steps), **META)
    if not (fsync_steps or sync_every):
        w.sync = lambda: None  # the old writer: nothing ever fsynced the journal
    times = []
    for step, cols in enumerate(data, start=1):
        t0 = time.perf_counter()
        w.write_step(step, cols)
        w.write_metrics(step, metrics_of(cols))
        if sync_every and step % sync_every == 0:
            w.sync()
        times.append((time.perf_counter() - t0) * 1000)
    w.close()
    shutil.rmtree(directory)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder under the repo)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trace_fsync.md"))
    args = p.parse_args()
    rng = random.Random(0)
    data = [synth_step(rng, s, args.steps, args.samples, 8) for s in range(args.steps)]
    root = Path(tempfile.mkdtemp(prefix="trace-fsync-", dir=args.dir or REPO))
    results: dict[str, list[float]] = {name: [] for name in POLICIES}
    try:
        for r in range(args.rounds):
            for i, (name, (fsync_steps, every)) in enumerate(POLICIES.items()):
                results[name] += one_pass(root / f"{r}-{i}", data, fsync_steps, every)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.mean(results["never"])
    lines = [
        f"{args.steps} steps x {args.samples} samples, {args.rounds} rounds alternated, written under "
        f"`{args.dir or 'the repo'}`; ms per step (write_step + write_metrics + the policy's fsyncs).",
        "",
        "| policy | mean ms/step | median | p95 | max | mean vs never |",
        "|---|---|---|---|---|---|",
    ]
    for name, times in results.items():
        q = statistics.quantiles(times, n=20)
        lines.append(
            f"| {name} | {statistics.mean(times):.2f} | {statistics.median(times):.2f} | {q[18]:.2f} | "
            f"{max(times):.1f} | {statistics.mean(times) / base:.2f}x |"
        )
    body = "\n".join(lines)
    print(body)
    print(f"wrote {write_results(args.out, 'Trace writer: ms per step by fsync policy', body)}")


if __name__ == "__main__":
    main()
