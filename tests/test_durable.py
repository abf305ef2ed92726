"""rlarith.durable: the one atomic-write helper and what an fsync error means."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlarith.durable import atomic_path, fsync_path, write_atomic


def test_a_write_appears_whole_and_a_failed_one_leaves_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "result.json"
    write_atomic(out, "old\n", durable=True)  # the folder is created
    assert out.read_text() == "old\n"
    with pytest.raises(RuntimeError, match="cut short"), atomic_path(out) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("cut short")
    assert out.read_text() == "old\n" and sorted(p.name for p in out.parent.iterdir()) == ["result.json"]
    write_atomic(out, b"new\n")
    assert out.read_bytes() == b"new\n"


def test_fsync_errors_are_raised_except_a_folder_fsync_the_filesystem_does_not_support(
    tmp_path: Path,
) -> None:
    fsync_path(tmp_path)  # a folder: its names made durable
    (tmp_path / "f").write_text("x")
    fsync_path(tmp_path / "f")
    with pytest.raises(FileNotFoundError):  # data that may not be on disk is never silently passed over
        fsync_path(tmp_path / "missing")
