"""Which run a trace folder belongs to: one run directory, recorded in the folder and checked at every start.

Traces often live on scratch (``$SCRATCH/rlarith/<name>-<hash>/traces``), away from the run directory, and a
scratch folder is easily shared by mistake: a ``traces.dir`` reused by two runs, a run directory copied
elsewhere and resumed. Two runs writing one trace folder mix their steps, and one run's start seals and
deletes the other's live journal. So:

- the folder records its owner in ``run.json`` (run id, the run directory's absolute path, host, since when),
  created once, atomically (a second run that races the first finds it there and is refused);
- every start checks it: another run id, or another run directory that still exists (a copy, or a run of
  the same name in another runs_dir), is refused with the fix (``TraceFolderTaken``, a ``ConfigError``);
  a run directory that moved (the recorded one is gone) takes the folder over, and so does a run whose
  trace folder lies inside its own run directory (a copy carries its traces with it);
- the folder is locked like the run directory (rlarith.runlock): ``.lock`` in it, held by rank 0 for the
  attempt, so two trainers never write one folder at once, even from two run directories.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlarith.config import ConfigError
from rlarith.durable import fsync_path
from rlarith.runlock import RunLock, RunLocked, read_holder
from rlarith.traces.format import read_journal

OWNER = "run.json"
"""The owner record in a trace folder: ``{"run_id", "run_dir", "host", "since"}``."""


class TraceFolderTaken(ConfigError):
    """The trace folder belongs to another run (or another run directory); the message names both and the fix."""


def read_owner(directory: Path) -> dict[str, Any]:
    """The folder's owner record ({} when there is none or it cannot be read)."""
    try:
        record = json.loads((Path(directory) / OWNER).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _found_run_id(directory: Path) -> str | None:
    """The run id recorded in the folder's traces (a shard's attribute, else a journal's first record):
    for folders written before owner records existed."""
    import h5py  # here: the trainer's preflight checks the owner before it imports anything heavy

    for path in sorted(directory.glob("*.h5"))[:1]:
        try:
            with h5py.File(path, "r", locking=False) as h5:
                return str(h5.attrs["run_id"])
        except (OSError, KeyError):
            return None
    for path in sorted(directory.glob("pending/*.journal"))[:1]:
        try:
            blocks = read_journal(path)
        except OSError:
            return None
        return str(blocks[0].attrs["run_id"]) if blocks else None
    return None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def problem(directory: Path, run_id: str, run_dir: Path) -> tuple[str | None, bool]:
    """``(why the run directory may not use the folder, or None; whether to record it as the owner)``."""
    directory, run_dir = Path(directory), Path(run_dir).resolve()
    owner = read_owner(directory)
    if not owner:
        inside = directory.resolve().is_relative_to(run_dir)  # its own traces/: its earlier config's, say
        found = _found_run_id(directory) if directory.is_dir() and not inside else None
        if found is not None and found != run_id:
            return (
                f"the trace folder {str(directory)!r} holds the traces of run {found}, not of this run "
                f"({run_id}, run directory {str(run_dir)!r})",
                False,
            )
        return None, True
    theirs = Path(str(owner.get("run_dir", "")))
    if theirs == run_dir or _same_dir(theirs, run_dir):  # ours (a forced config change changes the id)
        return None, owner.get("run_id") != run_id
    if directory.resolve().is_relative_to(run_dir) or not theirs.exists():
        return None, True  # its own traces/ (a copy carries them), or the run directory moved here
    other = "" if owner.get("run_id") == run_id else f" of run {owner.get('run_id')}"
    return (
        f"the trace folder {str(directory)!r} belongs to the run directory {str(theirs)!r}{other}, and this "
        f"run directory {str(run_dir)!r} is another one (a copy of it, or another run that was given the same "
        "trace folder)",
        False,
    )


def refusal(why: str, directory: Path) -> TraceFolderTaken:
    return TraceFolderTaken(
        f"traces.dir: {why}. Two runs in one trace folder would mix their steps. Give this run a trace folder "
        "of its own: leave traces.dir empty (the default is per run directory) or set traces.dir=<a new "
        f"folder>; to keep the steps recorded so far with a copied run, copy them there first (`rsync -a "
        f"--delete {directory}/ <new folder>/`). If the other run directory is gone for good, delete "
        f"{str(Path(directory) / OWNER)!r} and start again."
    )


def check(directory: Path, run_id: str, run_dir: Path) -> None:
    """Refuse (``TraceFolderTaken``) a trace folder that belongs to another run; writes nothing."""
    why, _ = problem(directory, run_id, run_dir)
    if why:
        raise refusal(why, directory)


def record(directory: Path, run_id: str, run_dir: Path) -> None:
    """Write the owner record: made complete under a temporary name, then linked in only if there is none
    (two starts racing: one wins, the other finds the winner's), or replaced when taking the folder over."""
    path = Path(directory) / OWNER
    tmp = path.with_name(f".{OWNER}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "run_id": run_id,
                "run_dir": str(Path(run_dir).resolve()),
                "host": socket.gethostname(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        + "\n"
    )
    try:
        fsync_path(tmp)
        if read_owner(directory):
            os.replace(tmp, path)  # a move or a copy's own traces/: checked by ``problem`` first
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another start won the race: ``claim`` checks it again
        fsync_path(directory)
    finally:
        tmp.unlink(missing_ok=True)


class TraceLock(RunLock):
    """rlarith.runlock's lock, on a trace folder: rank 0 holds ``<traces>/.lock`` for the attempt."""

    def _refusal(self) -> RunLocked:
        holder = read_holder(self.run_dir)
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "another process"
        return RunLocked(
            f"traces.dir: the trace folder {str(self.run_dir)!r} is in use by {who}, another run writing "
            "into it now; two runs in one trace folder would mix their steps. Give this run a trace folder "
            "of its own (leave traces.dir empty, or set another one); the lock is "
            f"{str(self.path)!r} and is released when its holder exits."
        )


def claim(directory: Path, run_id: str, run_dir: Path, rank: int) -> TraceLock:
    """At a writer's start: lock the folder (rank 0; other ranks check the holder is their rank 0), refuse
    it if it belongs to another run, record this run as its owner when it has none or was moved. The
    returned lock is released by the writer's ``close``."""
    lock = TraceLock(directory).acquire(rank)
    try:
        why, write = problem(directory, run_id, run_dir)
        if why is None and write and rank == 0:
            record(directory, run_id, run_dir)
            why, _ = problem(directory, run_id, run_dir)  # a racing start may have won the record
        if why:
            raise refusal(why, directory)
    except BaseException:
        lock.release()
        raise
    return lock
