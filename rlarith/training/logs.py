"""Log lines: every line has an ISO-8601 UTC timestamp, the global step and the rank; the screen shows a
selection (``FILE_ONLY`` lines go to the run's log file alone)."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlarith.training.identity import global_rank

log = logging.getLogger("rlarith")

FILE_ONLY = {"file_only": True}
"""``log.info(..., extra=FILE_ONLY)``: a detail for the run's log file, not the screen."""


def _screen(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


class StepFilter(logging.Filter):
    """Stamps every record with the trainer's global step (once ``trainer`` is set) and the rank."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Any = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.step = self.trainer.state.global_step if self.trainer is not None else 0
        record.rank = global_rank()
        return True


class _IsoFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return (
            datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"
        )


def setup_logging() -> StepFilter:
    """Every line: ISO-8601 UTC timestamp, global step, rank; on the screen and (``log_to_file``) in the run."""
    step_filter = StepFilter()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_IsoFormatter("%(asctime)s step %(step)d rank %(rank)d | %(message)s"))
    handler.addFilter(step_filter)
    handler.addFilter(_screen)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return step_filter


class RunLogFile(logging.FileHandler):
    """The run's log file. A write that fails (a full or read-only disk) is said once on stderr, not as a
    traceback per line; the screen keeps every line, and the error that stops the run names the cause."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        if not self.failed:
            self.failed = True
            err = sys.exc_info()[1]
            print(f"rlarith: cannot write the run's log {self.baseFilename} ({err}); lines go to the screen "
                  "only from now on", file=sys.stderr)  # fmt: skip


def sync_log_files() -> None:
    """fsync the run's log files (before a checkpoint is sealed: its log survives a node crash)."""
    for handler in log.handlers:
        if isinstance(handler, RunLogFile) and handler.stream is not None and not handler.failed:
            handler.flush()
            os.fsync(handler.stream.fileno())


def log_to_file(path: Path, step_filter: StepFilter) -> None:
    """Also append every line to ``path`` (one file per rank): no need to pipe the output to keep it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RunLogFile(path)
    handler.setFormatter(log.handlers[0].formatter)
    handler.addFilter(step_filter)
    log.addHandler(handler)
