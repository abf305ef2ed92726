"""The attempts record: one line per start and one per end of every attempt of a run (``attempts.jsonl``).

An attempt is one start of the trainer: a SLURM job's first run or a restart after a requeue
(``<job id>.<restart count>``), or a local run. The job driver (``rlarith.launch``, on the host) appends a
``start`` record before it starts the trainer and an ``end`` record when the trainer exits, saying why it
ended and what happens next. A rank other than 0 whose trainer failed appends a ``rank`` record with its
own error, so the job's message names the rank that failed first, not a peer's secondary error ("connection
reset by peer"), even when rank 0's driver is killed before it writes the end. An attempt with a start and
no end was killed without warning (node failure, SIGKILL) or is still running; the next attempt of the same
job records its end for it (``lost``). ``rlarith status RUN`` and ``rlarith submit --wait`` read this file;
a record is appended with one ``write`` (lines stay whole when several jobs share a filesystem).

This module imports no torch: it runs on login nodes.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlarith.training.identity import iso_time

RECORD = "attempts.jsonl"

ENDINGS = {
    "finished": "training reached max_steps",
    "preempted": "SLURM preempted the job; saved and requeued",
    "timeout": "the time limit came; saved and requeued",
    "timeout-limit": "the time limit came once more than slurm.max_timeouts allows; saved, not requeued",
    "cancelled": "cancelled (scancel); saved, not requeued: submit again to resume",
    "stopped": "stopped on a signal after saving; resumable (run the same command again)",
    "requeued": "requeued from outside (scontrol requeue or a signal); saved first",
    "requeue-failed": "stopped and saved, but scontrol requeue failed: submit again to resume",
    "failed": "failed; not requeued",
    "failed-requeued": "a rank failed after progress; requeued from the latest checkpoint",
    "lost": "ended without a word (node failure or SIGKILL); SLURM restarted the job",
}
"""Why an attempt ended (the ``ended`` field of an end record)."""


@dataclass
class Attempt:
    """One line of ``attempts.jsonl``."""

    event: str
    """``start`` or ``end``."""
    attempt: str
    """``<job id>.<restart count>``."""
    job_id: str
    time: str = field(default_factory=iso_time)
    host: str = ""
    restart: int = 0
    first_step: int | None = None
    """start: the step the attempt begins with (the resumed checkpoint's step + 1)."""
    last_step: int | None = None
    """end: the last step the attempt logged."""
    checkpoint: int | None = None
    """end: the step of the latest valid checkpoint."""
    ended: str | None = None
    """end: a key of ``ENDINGS``."""
    exit: int | None = None
    """end: the trainer's exit status (negative: killed by that signal)."""
    signalled: str | None = None
    """end: when the driver received the stop signal (ISO time), if it did."""
    rank: int | None = None
    """rank / end of a failure: the rank whose failure ended the attempt."""
    reason: str = ""
    """end: why it was (or was not) requeued, in words."""
    detail: str = ""
    """The failing trainer's last lines of stderr."""


def append(run_dir: Path, record: Attempt) -> None:
    path = Path(run_dir) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({k: v for k, v in asdict(record).items() if v not in (None, "")}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read(run_dir: Path) -> list[dict[str, Any]]:
    """Every record, oldest first; a torn last line (a crash mid-write) is skipped."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def merged(run_dir: Path) -> list[dict[str, Any]]:
    """One row per attempt: its start record updated with its end record (if any), oldest first; the
    ``rank`` records of failed ranks under ``ranks`` (oldest first)."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in read(run_dir):
        row = rows.setdefault(rec["attempt"], {"attempt": rec["attempt"]})
        if rec.get("event") == "start":
            row.update({k: v for k, v in rec.items() if k != "event"}, start=rec["time"])
        elif rec.get("event") == "rank":
            row.setdefault("ranks", []).append(rec)
        else:
            row.update({k: v for k, v in rec.items() if k not in ("event", "host", "time")}, end=rec["time"])
    return list(rows.values())


def rank_failures(run_dir: Path, attempt: str) -> list[dict[str, Any]]:
    """The ``rank`` records of ``attempt``, the first failure first (by when each trainer exited)."""
    found = [r for r in read(run_dir) if r.get("event") == "rank" and r.get("attempt") == attempt]
    return sorted(found, key=lambda r: r.get("time", ""))


def failure_text(rec: dict[str, Any]) -> str:
    """One line for a failed rank: ``rank 1 on n2: the trainer exited with status -9 (SIGKILL)``."""
    code = rec.get("exit")
    how = f"status {code}"
    if isinstance(code, int) and code < 0:
        try:
            how += f" (killed by {signal.Signals(-code).name})"
        except ValueError:
            pass
    last = [line for line in (rec.get("detail") or "").splitlines() if line.strip()]
    said = f"; its last line: {last[-1].strip()}" if last else ""
    return f"rank {rec.get('rank', '?')} on {rec.get('host', '?')}: the trainer exited with {how}{said}"


def count(run_dir: Path, job_id: str, *ended: str) -> int:
    """How many attempts of ``job_id`` ended with one of ``ended`` (e.g. the timeouts a job has used)."""
    return sum(1 for r in merged(run_dir) if r.get("job_id") == job_id and r.get("ended") in ended)
