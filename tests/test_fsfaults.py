"""The filesystem faults of tests/fsfaults.py are real: a full tmpfs refuses writes, a flipped image refuses
them on files already open, and a crash keeps what was fsynced and loses what was not."""

from __future__ import annotations

import errno
import os

import pytest
from fsfaults import fill, unfill


def test_full_tmpfs_refuses_writes(small_tmpfs):
    scratch = small_tmpfs("1M")
    fill(scratch, leave=8192)
    (scratch / "small").write_bytes(b"x" * 4096)  # what was left still takes a small file
    with pytest.raises(OSError) as e:
        (scratch / "big").write_bytes(b"x" * 65536)
    assert e.value.errno == errno.ENOSPC
    unfill(scratch)
    (scratch / "big").write_bytes(b"x" * 65536)


def test_flipped_image_refuses_writes_on_open_files(ext4_image):
    disk = ext4_image("16M")
    with open(disk.path / "open", "wb", buffering=0) as f:
        f.write(b"before")
        disk.flip_read_only()
        with pytest.raises(OSError) as e:
            f.write(b"after")
        assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        (disk.path / "new").write_bytes(b"x")
    assert e.value.errno == errno.EROFS


def test_crash_keeps_what_was_fsynced_only(ext4_image):
    disk = ext4_image("16M")
    with open(disk.path / "synced", "wb") as f:
        f.write(b"A" * 5000)
        os.fsync(f.fileno())
    dir_fd = os.open(disk.path, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    with open(disk.path / "synced", "ab") as f:
        f.write(b"B" * 100)  # appended, not fsynced
    (disk.path / "unsynced").write_bytes(b"C" * 5000)
    disk.crash()
    with pytest.raises(OSError) as e:
        (disk.path / "after").write_bytes(b"x")
    assert e.value.errno == errno.EIO
    disk.remount()
    assert (disk.path / "synced").read_bytes() == b"A" * 5000
    assert not (disk.path / "unsynced").exists()
