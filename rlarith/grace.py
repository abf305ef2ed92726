"""The grace budget: does one training step plus one full save fit between SLURM's warning and its kill?

A stop signal (USR2 ``slurm.signal_delay_s`` before the time limit, or at a preemption, which then waits
the partition's ``GraceTime`` before SIGTERM) is answered at the next step boundary with a full save. If
one step plus one save takes longer than that, the save is killed half-way and the attempt's work since
the previous checkpoint is lost. ``rlarith doctor``, the job driver at every start and the trainer after
its first save of an attempt all judge the budget with ``verdict``. No torch here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from rlarith import metrics

SAVE_LINE = re.compile(r"\bsaved\b.*?(?:\bin |\()(\d+(?:\.\d+)?) s\b")
"""A save's duration in a run log: ``saved <path> in 0.2 s`` or ``checkpoint-2 saved: ... (0.2 s)``."""


def measured_times(run_dir: Path) -> tuple[float | None, float | None]:
    """The slowest recent step (``step_time`` of the last 50 logged steps in metrics.jsonl) and the slowest
    save (the save lines of logs/rank0.log); None where the run has none yet."""
    steps: list[float] = []
    try:
        steps = [
            float(r["step_time"])
            for r in metrics.read(run_dir)
            if isinstance(r.get("step_time"), (int, float))
        ]
    except OSError:
        pass
    saves: list[float] = []
    try:
        saves = [float(m.group(1)) for m in SAVE_LINE.finditer((run_dir / "logs" / "rank0.log").read_text())]
    except OSError:
        pass
    return (max(steps[-50:]) if steps else None), (max(saves) if saves else None)


def partition_grace_s(partition: str) -> int | None:
    """The partition's preemption ``GraceTime`` in seconds; None when unknown (no SLURM, no partition)."""
    if not partition:
        return None
    try:
        text = subprocess.run(
            ["scontrol", "show", "partition", "-o", partition], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"GraceTime=(\d+)", text)
    return int(match.group(1)) if match else None


def verdict(step_s: float, save_s: float, signal_delay_s: int, grace_s: int | None = None) -> tuple[str, str]:
    """``(OK|WARN|FAIL, sentence)``: one step plus one save against the signal lead time and, for a
    preemptible partition, its GraceTime (0 means SLURM gives no time at all and is left out).

    >>> verdict(0.5, 8.0, 120)[0], verdict(0.5, 8.0, 120, grace_s=15)[0], verdict(0.5, 8.0, 8)[0]
    ('OK', 'WARN', 'FAIL')
    >>> verdict(0.5, 8.0, 120, grace_s=5)[1]
    'one step 0.50 s + one save 8.00 s = 8.50 s of 5 s (the partition GraceTime): a stop signal cannot end in a checkpoint; raise the partition GraceTime to at least 17 s'
    """
    limits = [(signal_delay_s, "slurm.signal_delay_s")]
    if grace_s:
        limits.append((grace_s, "the partition GraceTime"))
    budget, name = min(limits)
    need = step_s + save_s
    detail = f"one step {step_s:.2f} s + one save {save_s:.2f} s = {need:.2f} s of {budget} s ({name})"
    if need > budget:
        return (
            "FAIL",
            f"{detail}: a stop signal cannot end in a checkpoint; raise {name} to at least {2 * need:.0f} s",
        )
    if 2 * need > budget:
        return "WARN", f"{detail}: under 2x headroom (steps and saves vary); consider {2 * need:.0f} s"
    return "OK", detail
