"""Who is running: the rank, the attempt (one start of a run), the run id, and ISO timestamps."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from rlarith.config import RESUMABLE_KEYS, RunConfig, flat


def iso_time(seconds: float | None = None) -> str:
    """``2026-11-26T04:08:20.897Z``: UTC, milliseconds (``seconds`` since the epoch; default now)."""
    moment = datetime.now(timezone.utc) if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Attempt:
    """One start of a run: a SLURM job restart or a local process."""

    id: str
    seq: int
    """Orders attempts chronologically (the reader keeps each step from the latest attempt)."""

    @classmethod
    def current(cls) -> Attempt:
        job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
        if job:
            return cls(id=f"{job}.{restarts}", seq=time.time_ns())
        return cls(id=f"local-{socket.gethostname()}-{os.getpid()}", seq=time.time_ns())


def run_id(cfg: RunConfig) -> str:
    """Name plus a hash of everything that defines the run (not the resumable keys)."""
    fixed = {k: v for k, v in flat(cfg).items() if not k.startswith(RESUMABLE_KEYS)}
    digest = hashlib.sha1(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.name}-{digest}"


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))
