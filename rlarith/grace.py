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


def _seconds(text: str) -> int | None:
    """SLURM's durations: ``15`` (GraceTime in scontrol, seconds), ``00:00:20``, ``1-00:00:00`` (sacctmgr).

    >>> _seconds("15"), _seconds("00:00:20"), _seconds("01:02"), _seconds("1-00:00:00"), _seconds("")
    (15, 20, 62, 86400, None)
    """
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        return None
    days, *parts = match.groups()
    units = [int(x) for x in parts if x is not None]
    total = 0
    for unit in units if len(units) > 1 else []:
        total = total * 60 + unit
    return (total if len(units) > 1 else units[0]) + int(days or 0) * 86400


def partition_grace_s(partition: str, qos: str = "") -> int | None:
    """The preemption ``GraceTime`` in seconds of the partition and of the QOS (``slurm.qos``), the shorter
    where both have one: SLURM applies the partition's under ``preempt/partition_prio`` and the QOS's under
    ``preempt/qos``, and the checkpoint must fit whichever it is. None when unknown (no SLURM, no partition)."""
    found: list[int] = []
    try:
        if partition:
            text = subprocess.run(
                ["scontrol", "show", "partition", "-o", partition], capture_output=True, text=True, timeout=30
            ).stdout
            match = re.search(r"GraceTime=(\d+)", text)
            found += [int(match.group(1))] if match else []
        if qos:
            text = subprocess.run(
                ["sacctmgr", "-n", "-P", "show", "qos", qos, "format=GraceTime"],
                capture_output=True, text=True, timeout=30,
            ).stdout  # fmt: skip
            found += [s for s in map(_seconds, text.split()[:1]) if s is not None]
    except (OSError, subprocess.TimeoutExpired):
        pass
    if not found:
        return None
    positive = [g for g in found if g > 0]
    return min(positive) if positive else 0


def verdict(step_s: float, save_s: float, signal_delay_s: int, grace_s: int | None = None) -> tuple[str, str]:
    """``(OK|WARN|FAIL, sentence)``: one step plus one save against the signal lead time and, for a
    preemptible partition or QOS, its GraceTime (0 means SLURM gives no time at all and is left out).

    >>> verdict(0.5, 8.0, 120)[0], verdict(0.5, 8.0, 120, grace_s=15)[0], verdict(0.5, 8.0, 8)[0]
    ('OK', 'WARN', 'FAIL')
    >>> verdict(0.5, 8.0, 120, grace_s=5)[1]
    'one step 0.50 s + one save 8.00 s = 8.50 s of 5 s (the preemption GraceTime): a stop signal cannot end in a checkpoint; raise the preemption GraceTime to at least 17 s'
    """
    limits = [(signal_delay_s, "slurm.signal_delay_s")]
    if grace_s:
        limits.append((grace_s, "the preemption GraceTime"))
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
