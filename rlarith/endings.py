"""How a job's attempt ended, and what happens next: requeue, stop, or restart after a failure.

The job driver (``rlarith.launch.TrainJob``) calls these when the trainer exits; no torch here.

- A stop signal (the trainer saved and exited 75) is explained by SLURM itself (``scontrol show job``):
  a ``PreemptTime`` is a preemption; a job state ``CANCELLED`` is ``scancel`` (which also sets ``EndTime``
  to now, so ``EndTime`` says nothing about the time limit); the time limit is ``StartTime + TimeLimit``;
  anything else (``scontrol requeue``, ``scancel --signal``) is a requeue from outside. Preemptions, time
  limits (``slurm.max_timeouts``) and outside requeues are requeued; a cancel is saved and never requeued.
- A failed rank (any other exit) is requeued only when the attempt advanced past the checkpoint it resumed
  from, and at most ``slurm.max_failures`` times per job; a failure that repeats without progress stops.
- An attempt that ended without a word (its rank 0 killed with its node) is recorded ``lost`` by the next
  attempt of the same job, which SLURM restarted by itself (``JobRequeue=1`` requeues a ``NODE_FAIL``); it
  counts against ``slurm.max_failures`` too, so a node that keeps dying does not restart the job forever.
- ``scontrol requeue`` is retried, and the attempt's record says whether it happened.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

from rlarith import attempts
from rlarith.durable import EXIT_STORAGE

SLURM_SIGNAL_EARLY_S = 60
"""SLURM may send ``--signal`` up to this many seconds before the time asked for."""

REQUEUE_TRIES = 6
"""``scontrol requeue`` attempts, 2, 4, 8, 16, 32 s apart: a busy controller answers "Socket timed out",
and a restarting one not at all (scontrol gives up after ~10 s); a minute covers a controller restart."""

FAILURE_ENDINGS = ("failed-requeued", "lost")
"""Endings that used one of ``slurm.max_failures``."""


def scontrol_job(job_id: str) -> dict[str, str]:
    """``scontrol show job -o``'s fields; empty when scontrol is missing or the job is unknown."""
    try:
        text = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", text))


def limit_seconds(text: str) -> int | None:
    """SLURM's ``TimeLimit`` (``[days-]hours:minutes:seconds``, ``minutes:seconds``) in seconds; None for
    ``UNLIMITED`` or anything unparsable.

    >>> limit_seconds("1-02:03:04"), limit_seconds("00:10:00"), limit_seconds("10:00"), limit_seconds("UNLIMITED")
    (93784, 600, 600, None)
    """
    days, _, rest = text.rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        total = int(days or 0) * 86400
    except ValueError:
        return None
    while len(parts) < 3:
        parts.insert(0, 0)
    return total + parts[-3] * 3600 + parts[-2] * 60 + parts[-1]


def time_limit_at(fields: dict[str, str]) -> float | None:
    """When the attempt's time limit falls (``StartTime + TimeLimit``, as a timestamp); None if unknown."""
    limit = limit_seconds(fields.get("TimeLimit", ""))
    try:
        start = datetime.fromisoformat(fields["StartTime"]).timestamp()
    except (KeyError, ValueError):
        return None
    return None if limit is None else start + limit


def why_signalled(fields: dict[str, str], signalled_at: float, signal_delay_s: int) -> str:
    """``preempted``, ``cancelled``, ``timeout`` or ``requeued`` (a requeue from outside, ``scancel
    --signal``, or SLURM unreachable), from ``scontrol show job`` after the trainer stopped.

    Seen on SLURM 22.05: ``scancel`` shows ``JobState=COMPLETING`` (or ``CANCELLED``) with ``EndTime`` set
    to the cancel; ``scontrol requeue`` shows ``COMPLETING`` too, with ``Restarts`` already counted up and
    ``EndTime`` left at the limit; a time limit's early signal finds the job ``RUNNING``. So the time limit
    is ``StartTime + TimeLimit``, and a job ending early that SLURM did not requeue was cancelled.

    >>> at = datetime(2026, 11, 26, 10, 0).timestamp()
    >>> why_signalled({"PreemptTime": "2026-11-26T10:00:00", "JobState": "RUNNING"}, at, 90)
    'preempted'
    >>> job = {"PreemptTime": "None", "StartTime": "2026-11-26T09:00:00", "TimeLimit": "01:00:00", "Restarts": "0"}
    >>> why_signalled({**job, "JobState": "COMPLETING", "EndTime": "2026-11-26T09:58:20"}, at - 100, 90)
    'cancelled'
    >>> why_signalled({**job, "JobState": "COMPLETING", "Restarts": "1", "EndTime": "2026-11-26T10:00:00"}, at - 900, 90)
    'requeued'
    >>> why_signalled({**job, "JobState": "RUNNING"}, at - 100, 90), why_signalled({**job, "JobState": "RUNNING"}, at - 3600, 90)
    ('timeout', 'requeued')
    """
    if fields.get("PreemptTime", "None") not in ("None", "Unknown", ""):
        return "preempted"
    state = fields.get("JobState", "")
    if state == "CANCELLED":
        return "cancelled"
    limit = time_limit_at(fields)
    if state == "COMPLETING" and not requeued_by_slurm(fields):
        try:
            end = datetime.fromisoformat(fields["EndTime"]).timestamp()
        except (KeyError, ValueError):
            end = None
        if end is not None and limit is not None and end < limit - 1:  # scancel sets EndTime to now
            return "cancelled"
    if limit is not None and limit - signalled_at <= signal_delay_s + SLURM_SIGNAL_EARLY_S:
        return "timeout"
    return "requeued"


def requeued_by_slurm(fields: dict[str, str]) -> bool:
    """SLURM has requeued this attempt already (``scontrol requeue`` from outside): its ``Restarts`` is
    past this attempt's ``SLURM_RESTART_COUNT``."""
    try:
        return int(fields["Restarts"]) > int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except (KeyError, ValueError):
        return False


def requeue(job_id: str, tries: int = REQUEUE_TRIES) -> str:
    """``scontrol requeue JOB``, retried; '' when it was accepted, else what scontrol said the last time."""
    said = ""
    for attempt in range(tries):
        if attempt:
            time.sleep(2**attempt)
        try:
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            said = str(err)
            continue
        if done.returncode == 0:
            return ""
        said = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        # A controller that answered too late may have done it ("Socket timed out", then "Job is pending
        # execution" on the retry): SLURM counting the restart is the truth.
        if requeued_by_slurm(scontrol_job(job_id)):
            return ""
    return said


def no_requeue(job_id: str) -> None:
    """``scontrol update JobId=JOB Requeue=0``: the job ends with this attempt. A failure that is not
    requeued must not be restarted by SLURM either when a node of the job is declared dead afterwards
    (``NODE_FAIL`` requeues a requeueable job by itself)."""
    try:
        subprocess.run(
            ["scontrol", "update", f"JobId={job_id}", "Requeue=0"], capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


def after_failure(
    run_dir: Path,
    job_id: str,
    resumed_from: int,
    checkpoint: int | None,
    max_failures: int,
    exits: tuple[int | None, ...] = (),
) -> tuple[bool, str]:
    """Whether a failed attempt is requeued, and why (or why not), in words.

    Requeued only when it saved a checkpoint past the one it resumed from (``resumed_from``, 0 for none)
    and the job has used fewer than ``max_failures`` restarts after failures. A storage error (a rank's
    exit in ``exits`` is ``EXIT_STORAGE``: a full or read-only disk) is never requeued: the next attempt
    would meet the same disk.

    >>> after_failure(Path("/nonexistent"), "7", 2, 4, 2, exits=(74,))
    (False, 'a storage error (exit 74: a full, read-only or vanished disk; the trainer said which file): not requeued, the next attempt would meet the same disk')
    """
    if EXIT_STORAGE in exits:
        return False, (
            f"a storage error (exit {EXIT_STORAGE}: a full, read-only or vanished disk; the trainer said which "
            "file): not requeued, the next attempt would meet the same disk"
        )
    used = attempts.count(run_dir, job_id, *FAILURE_ENDINGS)
    if not checkpoint or checkpoint <= resumed_from:
        since = f"checkpoint-{resumed_from}" if resumed_from else "the start"
        return False, f"no progress since {since} (a failure that repeats would repeat forever): not requeued"
    if used >= max_failures:
        return (
            False,
            f"out of restarts after failures ({used} of slurm.max_failures={max_failures}): not requeued",
        )
    return True, (
        f"advanced to checkpoint-{checkpoint} (from {resumed_from or 'the start'}): requeued, restart "
        f"{used + 1} of slurm.max_failures={max_failures}"
    )


def before_restart(
    run_dir: Path, job_id: str, restart: int, checkpoint: int | None, max_failures: int
) -> str:
    """At the start of a restart (rank 0): record the previous attempt's end if it has none (``lost``);
    '' when this restart may run, else why not.

    SLURM restarts a job by itself after a node failure (``JobRequeue=1``); rlarith did not decide it.
    It may run while the job is within ``max_failures``. A restart after an attempt that ended ``failed``
    (not requeued: no progress) or ``cancelled`` is SLURM's alone and does not run."""
    if restart == 0:
        return ""
    previous = [
        r for r in attempts.merged(run_dir) if r.get("job_id") == job_id and r.get("restart", 0) < restart
    ]
    if not previous:
        return ""
    last = previous[-1]
    if "end" not in last:
        failures = attempts.rank_failures(run_dir, last["attempt"])
        first = attempts.failure_text(failures[0]) if failures else ""
        attempts.append(
            run_dir,
            attempts.Attempt(
                "end",
                last["attempt"],
                job_id,
                restart=last.get("restart", 0),
                checkpoint=checkpoint,
                ended="lost",
                rank=failures[0].get("rank") if failures else None,
                reason="recorded by the next attempt: its rank 0 ended without a word (node failure or "
                "SIGKILL), and SLURM restarted the job",
                detail=first,
            ),
        )
        used = attempts.count(run_dir, job_id, *FAILURE_ENDINGS)
        if used > max_failures:
            return (
                f"attempt {last['attempt']} was lost (node failure or SIGKILL) and the job has used its "
                f"restarts after failures ({used - 1} of slurm.max_failures={max_failures})"
            )
        return ""
    if last.get("ended") in ("failed", "cancelled"):
        return (
            f"SLURM restarted the job after attempt {last['attempt']} ended {last['ended']} "
            f"({last.get('reason') or attempts.ENDINGS.get(last['ended'], '')}); rlarith does not run it again"
        )
    return ""
