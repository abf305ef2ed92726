"""One writer per run directory: an exclusive advisory lock on ``<run>/.lock`` for a whole attempt.

Two trainers on one run directory corrupt it (interleaved metrics and traces; one start's
``clean_staging`` deletes the checkpoint the other is writing). So rank 0 of every attempt takes
``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run>/.lock`` before it writes anything, and holds it until the
attempt ends. The lock belongs to the open file, so it dies with the process however it dies (SIGKILL,
node failure on a local disk): a killed job never leaves a stale lock, and nothing needs cleaning. The
holder writes who it is into the file (host, pid, SLURM job id, since when); a second start refuses at
once with those (``RunLocked``, a ``ConfigError``: exit 2). One exception: when the holder is an earlier
attempt of the same SLURM job, the start waits for it (``RLARITH_LOCK_WAIT_S``, set by the job driver from
``slurm.lock_wait_s``; 300 s by default). After a real node crash the dead rank 0's lock can linger on a
shared filesystem (NFSv3 until the lock manager notices, Lustre until it evicts the client), and the job
SLURM restarted must not fail for it.

Ranks other than 0 take no lock, but they look: if the lock is held by another job (not by their own
rank 0, recognised by the ``MASTER_ADDR:MASTER_PORT`` of the process group), they refuse too, rather
than wait for a rank 0 that has refused.

Filesystems without ``flock``: NFS (v4, or v3 with a lock manager) and Lustre mounted with ``-o flock``
support it; Lustre mounted ``-o noflock`` or ``localflock`` (the latter only locks within one node),
some FUSE filesystems and old NFS without ``lockd`` do not. When ``flock`` fails with anything but "held
by someone else", the start refuses and says so. To run anyway, set ``RLARITH_RUN_LOCK=off``: a warning
is logged and nothing is locked, so you must make sure yourself that one job at a time uses the run
directory (e.g. a SLURM ``--dependency=singleton`` with a job name per run).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlarith.config import ConfigError

LOCK_FILE = ".lock"
ENV_SWITCH = "RLARITH_RUN_LOCK"
"""``off`` (or ``0``/``no``/``false``): do not lock (filesystems without ``flock``; see the module doc)."""

log = logging.getLogger("rlarith")


class RunLocked(ConfigError):
    """Another process holds the run directory; the message names it."""


GROUP_WAIT_S = 30.0
"""How long a rank other than 0 waits for the holder's note to name its own process group."""

WAIT_ENV = "RLARITH_LOCK_WAIT_S"
"""Seconds a restarted job waits for a lock held by an earlier attempt of the same job (default below)."""
EARLIER_ATTEMPT_WAIT_S = 300.0


def lock_disabled() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("off", "0", "no", "false")


def _group() -> str:
    """The process group this rank belongs to (ranks of one attempt share it); '' for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ""
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "another process (it has not written who it is yet)"
    job = info.get("slurm_job_id")
    parts = [f"pid {info.get('pid', '?')} on {info.get('host', '?')}"]
    if job:
        parts.append(f"SLURM job {job}")
    parts.append(f"since {info.get('since', '?')}")
    return ", ".join(parts)


def read_holder(run_dir: Path) -> dict[str, Any]:
    """What the lock file says about its holder ({} when empty or unreadable)."""
    try:
        return json.loads((Path(run_dir) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


class RunLock:
    """The lock on one run directory, held from ``acquire`` until ``release`` (or process death)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, rank: int = 0) -> RunLock:
        """Rank 0: take the lock or raise ``RunLocked`` naming the holder. Other ranks: raise
        ``RunLocked`` only when another job holds it. ``ConfigError`` when the filesystem cannot lock."""
        if lock_disabled():
            if rank == 0:
                log.warning(
                    "%s=off: the run directory %s is NOT locked; make sure no other job uses it",
                    ENV_SWITCH,
                    self.run_dir,
                )
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC by default in Python
        try:
            got = self._try_lock(fd)
            # Another rank of this attempt may hold it for an instant while it looks (below): retry briefly.
            for _ in range(20 if rank == 0 else 0):
                if got:
                    break
                time.sleep(0.05)
                got = self._try_lock(fd)
            if rank == 0 and not got and self._held_by_earlier_attempt():
                got = self._wait_for_earlier_attempt(fd)
            if rank == 0:
                if not got:
                    raise self._refusal()
                self.fd, fd = fd, -1
                info = {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                    "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                    "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "group": _group(),
                }
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)
                return self
            # Our rank 0 may hold the lock and not have written who it is yet (or be half-way through):
            # look again for a while before calling the holder someone else.
            deadline = time.monotonic() + GROUP_WAIT_S
            while not got and read_holder(self.run_dir).get("group") != _group():
                if time.monotonic() > deadline:
                    raise self._refusal()
                time.sleep(0.1)
                got = self._try_lock(fd)
            if got:  # nobody holds it (our rank 0 has not taken it yet): let go at once
                fcntl.flock(fd, fcntl.LOCK_UN)
            return self
        finally:
            if fd >= 0:
                os.close(fd)

    def _held_by_earlier_attempt(self) -> bool:
        """The note names this SLURM job: only an earlier attempt of it can hold the lock (one rank 0 per
        attempt), so its holder is dead or dying and the lock goes when the filesystem notices."""
        job = os.environ.get("SLURM_JOB_ID", "")
        holder = read_holder(self.run_dir)
        return bool(job) and holder.get("slurm_job_id") == job and holder.get("pid") != os.getpid()

    def _wait_for_earlier_attempt(self, fd: int) -> bool:
        try:
            wait_s = float(os.environ.get(WAIT_ENV, EARLIER_ATTEMPT_WAIT_S))
        except ValueError:
            wait_s = EARLIER_ATTEMPT_WAIT_S
        log.warning(
            "the run lock %s is held by an earlier attempt of this job (%s), whose node may have died: "
            "waiting up to %.0f s for it to be released (slurm.lock_wait_s)",
            self.path,
            _holder_text(read_holder(self.run_dir)),
            wait_s,
        )
        started = time.monotonic()
        deadline = started + wait_s
        while time.monotonic() < deadline:
            time.sleep(1.0)
            if self._try_lock(fd):
                log.warning("the run lock was released after %.0f s; going on", time.monotonic() - started)
                return True
        return False

    def _try_lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise ConfigError(
                f"runs_dir: cannot lock the run directory {str(self.run_dir)!r} ({err.strerror}): its "
                "filesystem does not support flock (e.g. Lustre without -o flock). Mount it with flock "
                f"support or use another runs_dir; or set {ENV_SWITCH}=off to run without the lock, and "
                "make sure yourself that only one job uses this run directory."
            ) from None

    def _refusal(self) -> RunLocked:
        info = read_holder(self.run_dir)
        holder = _holder_text(info)
        if self._held_by_earlier_attempt():
            return RunLocked(
                f"the run directory {str(self.run_dir)!r} is still locked by an earlier attempt of this job "
                f"({holder}) after waiting {os.environ.get(WAIT_ENV, EARLIER_ATTEMPT_WAIT_S)} s: its node "
                "may be dead with the lock still granted by the filesystem. Raise slurm.lock_wait_s, or "
                f"make sure that process is gone and submit again; the lock is {str(self.path)!r}."
            )
        return RunLocked(
            f"the run directory {str(self.run_dir)!r} is in use by {holder}: two trainers on one run "
            "would corrupt it. Wait for that one to end (or stop it), or pick another name=...; the "
            f"lock is {str(self.path)!r} and is released when its holder exits, however it exits."
        )

    def release(self) -> None:
        """Let go (closing the file releases the flock); the file stays, its content is only a note."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
