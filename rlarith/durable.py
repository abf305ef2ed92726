"""Writes that are never seen half-done: the one atomic-write helper and the fsync helpers.

A file is written under a temporary name beside it (``.<name>.tmp``) and renamed over ``path`` when
complete, so a reader sees the old file or the new one, never half of one. ``durable=True`` also fsyncs
the file before the rename and the folder after it, so the new name survives a crashed node, not only a
killed process.

What an fsync error means, everywhere: a filesystem that does not support fsync on a folder (it answers
EINVAL or ENOTSUP; some network filesystems do) is not an error, since nothing more durable can be had
there; any other error (EIO, a vanished path) is raised, because data may not be on disk.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


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
