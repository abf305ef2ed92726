"""``metrics.jsonl``: one record per logged step, and which attempt produced it.

The trainer appends one JSON object per log event (``{"time", "step", ...TRL's logs}``; at the end of
training one more with ``train_runtime`` and friends). A run that resumes from checkpoint S re-runs the
steps after S that an interrupted attempt had already logged. So every attempt starts with
``start_attempt`` (rank 0, under the run lock, before training):

- the records of steps after S are moved to ``metrics.superseded.jsonl`` (each with the ``attempt`` that
  wrote it and ``superseded_by``): kept, never lost, but out of the default view;
- ``metrics.jsonl`` is rewritten atomically with the rest, plus one marker line for the new attempt:
  ``{"time", "step": S, "event": "attempt", "attempt": "<id>", "attempt_seq": <ns>, "resumed_from": S}``.

So ``metrics.jsonl`` holds each step once, and every record belongs to the attempt named by the marker
above it. Appends are fsynced (``sync``) before every checkpoint is sealed: whatever a valid checkpoint
covers is on disk. Readers should use ``read``: it attaches ``attempt`` to each record, skips markers and a
torn last line, and (should a file ever hold a step twice, e.g. one written before markers existed) keeps
the latest record per step and kind. ``read(run, all_attempts=True)`` returns the superseded records too.
This module never imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlarith.durable import fsync_path, write_atomic
from rlarith.training.identity import iso_time

METRICS = "metrics.jsonl"
SUPERSEDED = "metrics.superseded.jsonl"
_MARKER = "attempt"  # the "event" of an attempt's marker line


def _parse(lines: list[str]) -> list[tuple[str, dict[str, Any] | None]]:
    out: list[tuple[str, dict[str, Any] | None]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None  # a torn line (a process killed mid-write)
        out.append((line, record if isinstance(record, dict) else None))
    return out


def _attach(parsed: list[tuple[str, dict[str, Any] | None]]) -> list[tuple[str, dict[str, Any] | None]]:
    """Each record with the ``attempt`` of the marker above it (``None`` before any marker)."""
    current, out = None, []
    for line, record in parsed:
        if record is not None and record.get("event") == _MARKER:
            current = record.get("attempt")
        elif record is not None and "attempt" not in record:
            record = {**record, "attempt": current}
        out.append((line, record))
    return out


def start_attempt(run_dir: Path, attempt: str, attempt_seq: int, resumed_step: int) -> int:
    """Begin an attempt that resumes after step ``resumed_step`` (0: from the start): move the records of
    later steps (and torn lines) to ``SUPERSEDED``, rewrite ``METRICS`` atomically with the rest and this
    attempt's marker. Returns how many records were moved. Rank 0 only, under the run lock."""
    path, side = Path(run_dir) / METRICS, Path(run_dir) / SUPERSEDED
    lines = path.read_text().splitlines() if path.exists() else []
    keep, moved = [], []
    for line, record in _attach(_parse([ln for ln in lines if ln.strip()])):
        if record is None or not isinstance(record.get("step"), int):
            moved.append(json.dumps({"torn": line, "superseded_by": attempt}))
        elif record["step"] > resumed_step:
            moved.append(json.dumps({**record, "superseded_by": attempt}))
        else:
            keep.append(line)
    marker = {
        "time": iso_time(),
        "step": resumed_step,
        "event": _MARKER,
        "attempt": attempt,
        "attempt_seq": attempt_seq,
        "resumed_from": resumed_step,
    }
    if moved:  # the side file first: a crash in between leaves a record twice, never none
        with side.open("a") as fh:
            fh.write("".join(line + "\n" for line in moved))
            fh.flush()
            os.fsync(fh.fileno())
        write_atomic(path, "".join(line + "\n" for line in [*keep, json.dumps(marker)]), durable=True)
    else:
        with path.open("a") as fh:
            fh.write(json.dumps(marker) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    return len(moved)


def missing_steps(run_dir: Path, upto: int, every: int = 1) -> list[int]:
    """The steps up to ``upto`` that should have a training record (every ``every``-th: the run's
    ``training.logging_steps``) and have none: lost in a crash (before records were fsynced at every seal)
    or removed by hand.

    >>> import tempfile; run = Path(tempfile.mkdtemp())
    >>> _ = (run / METRICS).write_text('{"step": 2, "loss": 0.1}\\n')
    >>> missing_steps(run, 4), missing_steps(run, 4, every=2)
    ([1, 3, 4], [4])
    """
    have = {r.get("step") for r in read(run_dir) if _kind(r) == "train"}
    return [step for step in range(every, upto + 1, every) if step not in have]


def steps_text(steps: list[int]) -> str:
    """``1-3, 7``: consecutive steps as ranges.

    >>> steps_text([1, 2, 3, 7, 9, 10])
    '1-3, 7, 9-10'
    """
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def sync(run_dir: Path) -> None:
    """Make every record appended so far durable (the trainer calls it before a checkpoint is sealed, so a
    node crash never leaves a valid checkpoint of a step whose metrics are lost)."""
    path = Path(run_dir) / METRICS
    if path.exists():
        fsync_path(path)


def _kind(record: dict[str, Any]) -> str:
    if "loss" in record:
        return "train"
    return "summary" if "train_runtime" in record else "other"


def read(run_dir: Path, all_attempts: bool = False) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` in order, each with its ``attempt`` (markers and torn lines left
    out). Default view: one record per step and kind (the latest). ``all_attempts``: every record,
    the superseded ones included, ordered by time."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    lines = path.read_text().splitlines() if path.exists() else []
    records = [r for _, r in _attach(_parse(lines)) if r is not None and r.get("event") != _MARKER]
    if all_attempts:
        side = run_dir / SUPERSEDED
        extra = [r for _, r in _parse(side.read_text().splitlines())] if side.exists() else []
        records += [r for r in extra if r is not None and "torn" not in r]
        return sorted(records, key=lambda r: str(r.get("time", "")))
    latest: dict[tuple[Any, str], int] = {}
    for i, record in enumerate(records):
        latest[(record.get("step"), _kind(record))] = i
    return [records[i] for i in sorted(latest.values())]
