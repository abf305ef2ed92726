"""Who is running: the rank, the attempt (one start of a run), the run id, and ISO timestamps."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from rlarith.config import RESUMABLE_KEYS, RunConfig, flat


def iso_time(seconds: float | None = None) -> str:
    """``2026-11-26T04:08:20.897Z``: UTC, milliseconds (``seconds`` since the epoch; default now)."""
    moment = datetime.now(timezone.utc) if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


ATTEMPT_ENV = "RLARITH_ATTEMPT"
"""Set by the job driver (``rlarith.launch``) for the trainer it starts: both then record the same id."""


def new_attempt_id(job_id: str = "", restart: int | None = None) -> str:
    """A fresh id for one start of a run, unique per start.

    ``<job>.<restart>`` when the job driver starts a SLURM job (SLURM counts every start of a job);
    otherwise a random part is added: a restarted container keeps its hostname and pid (1), a local
    executor's job id is a pid, and a script may start the trainer twice in one SLURM job.

    >>> new_attempt_id("6631", 2)
    '6631.2'
    >>> import re; bool(re.fullmatch(r"local-\\S+-\\d+-[0-9a-f]{6}", new_attempt_id()))
    True
    """
    if job_id and restart is not None:
        return f"{job_id}.{restart}"
    unique = secrets.token_hex(3)
    if job_id:
        return f"{job_id}-{unique}"
    return f"local-{socket.gethostname()}-{os.getpid()}-{unique}"


@dataclass(frozen=True)
class Attempt:
    """One start of a run: a SLURM job restart or a local process."""

    id: str
    seq: int
    """Orders attempts chronologically (the reader keeps each step from the latest attempt)."""

    @classmethod
    def current(cls) -> Attempt:
        """The job driver's id when it started this trainer (``RLARITH_ATTEMPT``); else a new one."""
        given = os.environ.get(ATTEMPT_ENV, "")
        if given:
            return cls(id=given, seq=time.time_ns())
        job = os.environ.get("SLURM_JOB_ID", "")
        return cls(
            id=new_attempt_id(f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else ""),
            seq=time.time_ns(),
        )


def run_id(cfg: RunConfig) -> str:
    """Name plus a hash of everything that defines the run (not the resumable keys)."""
    fixed = {k: v for k, v in flat(cfg).items() if not k.startswith(RESUMABLE_KEYS)}
    digest = hashlib.sha1(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.name}-{digest}"


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))
