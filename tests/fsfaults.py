"""Real filesystem faults for tests: a small tmpfs that fills up, and a loop-mounted ext4 image that turns
read-only or crashes mid-run.

Both need root and mount(2) (CI runs as root); elsewhere the tests that use them are skipped, except under
``CI=true``, where a skip would hide the faults from review and is a failure instead.

Fixtures (registered in tests/conftest.py through ``pytest_plugins``); each unmounts what it mounted at teardown,
also when the test failed, lazily (``umount -l``) if a process the test started still holds a file there::

    def test_full_disk(small_tmpfs):
        scratch = small_tmpfs("4M")        # a fresh tmpfs of 4 MiB, as a Path
        fill(scratch, leave=64 * 1024)     # anything past the last 64 KiB now fails with ENOSPC

    def test_scratch_hiccup(ext4_image):
        disk = ext4_image("32M")           # Ext4Image; disk.path is the mount point
        ...                                # start the writer on disk.path
        disk.flip_read_only()              # every write from now on fails with EROFS (files stay open)

    def test_node_crash(ext4_image):
        disk = ext4_image()
        ...                                # write, fsync some of it
        disk.crash()                       # nothing more reaches the disk; I/O there fails with EIO
        disk.remount()                     # the journal replays, as at the next boot: only what was
                                           # fsynced (or committed) is there

How the faults are made, and why this way (found on this kernel, which has no device-mapper, so no dm-flakey):

- Read-only flip: the image is mounted ``errors=remount-ro`` and ``flip_read_only`` writes to ext4's
  ``/sys/fs/ext4/loopN/trigger_fs_error``, which raises a real filesystem error: the kernel aborts the journal
  and remounts read-only, exactly as when a disk or a network block device fails. ``mount -o remount,ro`` is
  refused ("mount point is busy") while a file is open for writing, and ``blockdev --setro`` on the loop device
  does not stop writes (the block layer only warns), so neither can flip a running writer's disk.
- Crash: ``crash`` issues ``EXT4_IOC_SHUTDOWN`` with ``EXT4_GOING_FLAGS_NOLOGFLUSH`` (xfstests' "godown"):
  the journal is not flushed and dirty pages are dropped, so the image keeps what a power cut would keep.
  The image is mounted with ``commit=600`` so that the journal's periodic 5-second commit does not make
  un-fsynced metadata durable behind the test's back (the page cache's own writeback starts after 30 s):
  what survives is what was fsynced. ``remount`` then mounts the image again; ext4 replays its journal.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# _IOR('X', 125, __u32) from linux/ext4.h; flag 2 is EXT4_GOING_FLAGS_NOLOGFLUSH (crash: no journal flush).
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2
FILLER = ".fsfaults-filler"


def _cannot(why: str) -> None:
    """Skip the test, or fail it under CI=true (CI runs as root: a skip there would hide a missing fault)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a real filesystem fault cannot be made here: {why}", pytrace=False)
    pytest.skip(why)


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")


def _require_mount() -> None:
    if os.geteuid() != 0:
        _cannot("mounting a tmpfs or a loop image needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        _cannot("mount/umount are not installed")


def _unmount(path: Path) -> None:
    """Unmount; if a process still holds a file there, detach lazily (it goes when the last file closes)."""
    if not os.path.ismount(path):
        return
    r = subprocess.run(["umount", str(path)], capture_output=True, text=True)
    if r.returncode != 0 and os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)


def fill(path: Path, leave: int = 0) -> int:
    """Fill the filesystem holding ``path`` with one filler file until only ``leave`` bytes are free (rounded to
    the filesystem's block). Returns the bytes written. ``unfill(path)`` gives the space back."""
    filler = Path(path) / FILLER
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(filler, "ab", buffering=0) as f:
        while True:
            free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
            want = min(len(chunk), free - leave)
            if want <= 0:
                break
            try:
                written += f.write(chunk[:want])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
        os.fsync(f.fileno())
    return written


def unfill(path: Path) -> None:
    """Remove the filler ``fill`` wrote."""
    (Path(path) / FILLER).unlink(missing_ok=True)


def resize(path: Path, size: str) -> None:
    """Give a ``small_tmpfs`` mount a new size (``mount -o remount,size=``): room made, as by an admin."""
    _run("mount", "-o", f"remount,size={size}", "tmpfs", str(path))


@dataclass
class Ext4Image:
    """A loop-mounted ext4 image at ``path`` (see the module docstring for how its faults are made)."""

    image: Path
    path: Path
    options: str = "errors=remount-ro,commit=600"
    crashed: bool = field(default=False, init=False)

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _run("mount", "-o", f"loop,{self.options}", str(self.image), str(self.path))

    def device(self) -> str:
        """The loop device's name (``loop3``), from the mount table."""
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == str(self.path):
                source = line.split(" - ")[1].split()[1]
                return Path(source).name
        raise OSError(f"{self.path} is not mounted")

    def flip_read_only(self, reason: str = "fsfaults: flipped read-only") -> None:
        """Raise a real ext4 error: the kernel aborts the journal and remounts read-only (EROFS from now on)."""
        trigger = Path("/sys/fs/ext4") / self.device() / "trigger_fs_error"
        if not trigger.exists():
            _cannot(f"this kernel has no {trigger}")
        trigger.write_text(reason + "\n")
        # The mount table still says "rw" (plus "emergency_ro"): check by writing.
        try:
            (self.path / ".fsfaults-probe").touch()
        except OSError as e:
            if e.errno == errno.EROFS:
                return
            raise
        raise OSError(f"{self.path} did not turn read-only after the error")

    def crash(self) -> None:
        """Cut the power: nothing more reaches the image; what was not fsynced (or committed) is lost.
        I/O on the mount fails with EIO until ``remount``."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)
        self.crashed = True

    def remount(self) -> None:
        """Unmount and mount again (after ``crash``: as at the next boot, the journal replays). Every process
        holding a file there must have exited first."""
        r = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(
                f"cannot unmount {self.path} (a process still holds a file there?): {r.stderr.strip()}"
            )
        self.crashed = False
        self.mount()

    def unmount(self) -> None:
        _unmount(self.path)


@pytest.fixture
def small_tmpfs() -> Iterator[Callable[[str], Path]]:
    """A factory: ``small_tmpfs("4M")`` mounts a fresh tmpfs of that size and returns its path."""
    _require_mount()
    mounted: list[Path] = []

    def make(size: str = "4M") -> Path:
        path = Path(tempfile.mkdtemp(prefix="rlarith-tmpfs-"))
        try:
            _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
        except OSError as e:
            path.rmdir()
            _cannot(str(e))
        mounted.append(path)
        return path

    try:
        yield make
    finally:
        for path in reversed(mounted):
            _unmount(path)
            with contextlib.suppress(OSError):
                path.rmdir()


@pytest.fixture
def ext4_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Ext4Image]]:
    """A factory: ``ext4_image("32M")`` makes an ext4 image of that size, loop-mounts it at a fresh path and
    returns the Ext4Image."""
    _require_mount()
    if shutil.which("mkfs.ext4") is None:
        _cannot("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
    images: list[Ext4Image] = []

    def make(size: str = "32M") -> Ext4Image:
        base = tmp_path_factory.mktemp("ext4")
        image = Ext4Image(image=base / "disk.img", path=base / "mnt")
        _run("truncate", "-s", size, str(image.image))
        # -m 0: no blocks reserved for root (we are root: a fill would otherwise stop short of full).
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image.image))
        try:
            image.mount()
        except OSError as e:
            _cannot(str(e))
        images.append(image)
        return image

    try:
        yield make
    finally:
        for image in reversed(images):
            image.unmount()
            image.image.unlink(missing_ok=True)
