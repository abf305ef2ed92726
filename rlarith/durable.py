"""Writes that are never seen half-done (the one atomic-write helper and the fsync helpers), and what a
failed write means to the user (``StorageError``).

A file is written under a temporary name beside it (``.<name>.tmp``) and renamed over ``path`` when
complete, so a reader sees the old file or the new one, never half of one. ``durable=True`` also fsyncs
the file before the rename and the folder after it, so the new name survives a crashed node, not only a
killed process.

What an fsync error means, everywhere: a filesystem that does not support fsync on a folder (it answers
EINVAL or ENOTSUP; some network filesystems do) is not an error, since nothing more durable can be had
there; any other error (EIO, a vanished path) is raised, because data may not be on disk.

A write the run needs that fails on the filesystem (full, over quota, read-only, an I/O error, a folder
removed) becomes a ``StorageError``: one paragraph with the file, what happened, what is intact and what to
do. ``rlarith`` prints it without a traceback and exits ``EXIT_STORAGE`` (74, sysexits' EX_IOERR): a
failure, and not 75, so a job is never requeued into the same full or read-only disk.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}

EXIT_STORAGE = 74
"""Exit status after a ``StorageError`` (sysexits' EX_IOERR): failed, not to be requeued (75 would be)."""

# What each storage errno means, and what to do about it (the path is filled in).
_MEANING: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "the filesystem is full",
        "free space there (`df -h {folder}`) or point runs_dir / traces.dir at a filesystem with room",
    ),
    errno.EDQUOT: ("you are over your disk quota there", "free space or raise the quota"),
    errno.EROFS: (
        "the filesystem is read-only (a storage fault remounts it so)",
        "wait until it is writable again (`touch {folder}/x` tells; ask your admins) or point runs_dir / "
        "traces.dir elsewhere",
    ),
    errno.EIO: ("an I/O error: the storage is failing", "check the storage (`dmesg`, your admins)"),
    errno.ENOENT: (
        "a folder on its path was removed while the run wrote there (a scratch purge?)",
        "keep the folder out of purges (the run recreates it)",
    ),
    errno.ESTALE: ("the network filesystem lost the file (stale handle)", "check the mount"),
    errno.EACCES: ("permission denied", "fix the permissions of {folder}"),
    errno.EPERM: ("operation not permitted", "fix the permissions of {folder}"),
}


class StorageError(Exception):
    """A file the run writes could not be written; the message is the paragraph the user reads."""


def os_error(err: BaseException) -> OSError | None:
    """The filesystem error behind ``err``: ``err`` itself, its causes, or an ``os error N`` in the message
    of a library that drops the errno (safetensors' Rust errors). None when it is not a storage error."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _MEANING:
            return current
        match = re.search(r"os error (\d+)|code: (\d+)", str(current))
        if match and int(match.group(1) or match.group(2)) in _MEANING:
            number = int(match.group(1) or match.group(2))
            return OSError(number, os.strerror(number))
        current = current.__cause__ or current.__context__
    return None


def storage_error(doing: str, path: Path | str | None, err: OSError, intact: str) -> StorageError:
    """The paragraph for a failed write: ``doing`` ("Writing checkpoint-12"), the file, what happened,
    ``intact`` (what is still good: sentences), and what to do. A folder for ``path`` (a serializer that
    does not name its file) names the file last written in it.

    >>> print(storage_error("Appending step 3 to metrics.jsonl", "runs/x/metrics.jsonl",
    ...       OSError(errno.ENOSPC, "No space left on device"), "Steps 1-2 are in it."))  # doctest: +ELLIPSIS
    Appending step 3 to metrics.jsonl failed: runs/x/metrics.jsonl: the filesystem is full (No space ... 28). ...
    """
    happened, todo = _MEANING.get(err.errno or 0, (err.strerror or str(err), "fix that"))
    where = Path(path if path is not None else (err.filename or "."))
    if where.is_dir():
        where = _last_written(where) or where
    folder = _existing(where if where.is_dir() else where.parent)
    code = errno.errorcode.get(err.errno or 0, "?")
    return StorageError(
        f"{doing} failed: {where}: {happened} ({err.strerror or err}; {code} {err.errno}). {intact} "
        f"To go on: {todo.format(folder=folder)}, then start the run again (it resumes from its latest "
        "valid checkpoint)."
    )


@contextmanager
def storage_errors(doing: str, path: Path | str | None, intact: str | Callable[[], str]) -> Iterator[None]:
    """Within the block, a storage error (``os_error``) becomes ``storage_error(doing, ...)``; anything
    else passes. The file named is the error's own when it has one, else ``path``. ``intact`` may be a
    function, called only on an error. An error that carries no errno (torch.save into a path says only
    "file write failed") is judged by a probe write where ``path`` is: if that fails too, it is the cause."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        cause = os_error(err)
        if cause is None and path is not None:
            cause = _probe(Path(path) if Path(path).is_dir() else Path(path).parent)
        if cause is None:
            raise
        said = intact() if callable(intact) else intact
        raise storage_error(doing, cause.filename or path, cause, said) from err


def writable(folder: Path | str, probe_bytes: int = 65536) -> str | None:
    """None when ``folder`` (or the nearest existing folder above it, where it would be created) takes a
    file of ``probe_bytes``, fsynced; else why not, in words. A real write, not ``os.access``: root passes
    ``os.access`` on a read-only mount, and an empty file fits on a full disk."""
    base = _existing(Path(folder))
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    err = _probe(base, probe_bytes)
    if err is None:
        return None
    happened = _MEANING.get(err.errno or 0, (err.strerror, ""))[0]
    return f"cannot write a file in {base}: {happened} ({err.strerror})"


def _probe(folder: Path, nbytes: int = 65536) -> OSError | None:
    """Write ``nbytes`` to a new file in ``folder``, fsync, remove it; the storage error that stopped it."""
    probe = folder / f".rlarith-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * nbytes)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        return err if err.errno in _MEANING else None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def _last_written(folder: Path) -> Path | None:
    """The most recently modified file under ``folder`` (the one a serializer was writing), or None."""
    try:
        files = [p for p in folder.rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    except OSError:
        return None


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def fsync_path(path: Path | str) -> None:
    """fsync a file's contents, or a folder's names (created, renamed, deleted)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (os.path.isdir(path) and err.errno in _UNSUPPORTED):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str, durable: bool = False) -> Iterator[Path]:
    """``with atomic_path(out) as tmp: write(tmp)``: ``out`` appears complete when the block ends
    without an error (its folder is created if needed); on an error the old ``out`` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_atomic(path: Path | str, data: str | bytes, durable: bool = False) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
