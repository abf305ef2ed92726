"""What a checkpoint holds, checked: the size and checksum of every file, recorded at seal time.

``seal`` (rlarith.checkpoints) reads every file the Trainer just wrote once, hashing it and fsyncing it in
the same pass, and writes ``CHECKSUMS.json`` before ``COMPLETE``:

    {"algorithm": "xxh3_128",
     "files": {"model.safetensors": {"size": 4255680, "xxh3_128": "9f..."}, ...},
     "required": ["trainer_state.json", ["model.safetensors", "model.safetensors.index.json"], ...]}

``required`` is what the trainer said a checkpoint must contain (weights, optimizer, scheduler, the RNG of
every rank, trainer and policy state): a staged folder missing any of it is never sealed. ``verify``
compares a sealed folder with its record: a missing, truncated, grown or altered file is a ``Problem``.

The hash is XXH3-128 (the ``xxhash`` package, which ``datasets`` already requires): it detects corruption,
not tampering, at several GB/s; SHA-256 or BLAKE2b are 5-10x slower on the CPUs measured
(docs/run-directory.md). Checkpoints sealed before checksums existed (no ``CHECKSUMS.json``) are checked
by the sizes in ``COMPLETE`` alone. This module never imports torch.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

CHECKSUMS = "CHECKSUMS.json"
"""Per-file size and checksum of a checkpoint; written (fsync'd) just before ``COMPLETE``."""
ALGORITHM = "xxh3_128"
_CHUNK = 8 * 2**20
_MARKERS = ("COMPLETE", CHECKSUMS)  # the record itself is not part of what it records

Required = Sequence[str | Sequence[str]]
"""Glob patterns (relative paths) that must each match a file; a sequence of patterns: any one of them."""


@dataclass(frozen=True)
class Problem:
    """Why a checkpoint is not what was sealed: one file and the reason, e.g. ``optimizer.pt: truncated``."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"

    @property
    def slug(self) -> str:
        """A short, filename-safe label: ``model.safetensors-checksum``.

        >>> Problem("global_step4/x.pt", "truncated (10 of 20 bytes)").slug
        'global_step4_x.pt-truncated'
        """
        word = self.reason.split()[0].strip(":,()") or "bad"
        return f"{self.file.replace('/', '_')}-{word}"


@dataclass
class Verified:
    """The result of ``verify``: problems (empty when the folder is what was sealed) and what was read."""

    problems: list[Problem]
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    checksums: bool = True
    """False when the folder predates checksums (sizes only) or ``digests=False`` was asked."""

    @property
    def ok(self) -> bool:
        return not self.problems


def digest_file(path: Path, fsync: bool = False) -> tuple[int, str]:
    """``(size, XXH3-128 hex digest)`` of ``path``, read once in 8 MiB chunks; ``fsync`` it in the same open."""
    h = xxhash.xxh3_128()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


class DigestingWriter:
    """A file being written that keeps its own ``record`` entry (size and checksum) as the bytes pass, so
    whoever writes it need not read it back; and every ``WRITEBACK_BYTES`` it has the kernel start writing
    what came so far to disk without waiting for it, so the disk works while the rest is produced and the
    final fsync waits for the tail only.

    >>> import io
    >>> out = DigestingWriter(io.BytesIO())
    >>> out.write(b"abc"), out.entry()["size"]
    (3, 3)
    """

    WRITEBACK_BYTES = 64 * 2**20

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.size = 0
        self._hash = xxhash.xxh3_128()
        self.started = 0
        """Bytes whose writeback was started."""
        self._writeback = hasattr(os, "posix_fadvise") and _has_fileno(raw)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.raw.write(view)  # a buffered file writes it all (or raises)
        self.size += view.nbytes
        if self._writeback and self.size - self.started >= self.WRITEBACK_BYTES:
            self.raw.flush()
            # Linux starts the writeback of a dirty range on DONTNEED and returns (Python has no
            # sync_file_range); pages already on disk are dropped, which a checkpoint never misses.
            os.posix_fadvise(
                self.raw.fileno(), self.started, self.size - self.started, os.POSIX_FADV_DONTNEED
            )
            self.started = self.size
        return view.nbytes

    def flush(self) -> None:
        self.raw.flush()

    def entry(self) -> dict[str, Any]:
        """This file's entry in ``CHECKSUMS.json``, as ``record`` would have made it."""
        return {"size": self.size, ALGORITHM: self._hash.hexdigest()}


def _has_fileno(raw: Any) -> bool:
    try:
        raw.fileno()
    except (AttributeError, OSError, ValueError):  # io.BytesIO raises UnsupportedOperation (an OSError)
        return False
    return True


def regular_files(root: Path) -> list[str]:
    """Relative paths of the regular files under ``root`` (symlinks skipped), sorted."""
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink() and path.is_file():
                out.append(path.relative_to(root).as_posix())
    return sorted(out)


def missing(root: Path, required: Required) -> list[str]:
    """The entries of ``required`` that no file under ``root`` matches (shown as ``a | b`` for alternatives).

    >>> missing(Path("/nonexistent"), ["a.pt", ("b.pt", "c/*.pt")])
    ['a.pt', 'b.pt | c/*.pt']
    """
    files = regular_files(root) if Path(root).is_dir() else []
    out = []
    for entry in required:
        patterns = [entry] if isinstance(entry, str) else list(entry)
        if not any(fnmatch.filter(files, pattern) for pattern in patterns):
            out.append(" | ".join(patterns))
    return out


def record(
    root: Path, required: Required = (), threads: int = 4, known: dict[str, dict] | None = None
) -> dict:
    """Hash and fsync every regular file under ``root`` (several files at once) and return the record for
    ``CHECKSUMS.json``. Raises ``FileNotFoundError`` naming what ``required`` lists and ``root`` lacks.
    ``known``: entries of files hashed and fsync'd as they were written (``DigestingWriter``), taken as
    they are when the file still has that size, instead of read again."""
    absent = missing(root, required)
    if absent:
        raise FileNotFoundError(
            f"checkpoint {root} lacks {', '.join(absent)}: not sealed (the save was incomplete)"
        )
    known = known or {}
    names, files = [], {}
    for name in regular_files(root):
        if name in _MARKERS:
            continue
        if name in known and known[name]["size"] == (Path(root) / name).stat().st_size:
            files[name] = known[name]
        else:
            names.append(name)
    names.sort(key=lambda n: -(Path(root) / n).stat().st_size)  # largest first: the pool finishes together
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        results = list(pool.map(lambda n: digest_file(Path(root) / n, fsync=True), names))
    files.update({n: {"size": size, ALGORITHM: digest} for n, (size, digest) in zip(names, results)})
    return {
        "algorithm": ALGORITHM,
        "files": dict(sorted(files.items())),
        "required": [e if isinstance(e, str) else list(e) for e in required],
    }


def verify(folder: Path, digests: bool = True) -> Verified:
    """Compare the sealed checkpoint ``folder`` with its record: every recorded file present with its size
    and (``digests``) its checksum, and every required entry present. Sizes only (a few ``stat`` calls)
    with ``digests=False`` or for a folder sealed before checksums."""
    folder = Path(folder)
    started = time.perf_counter()
    try:
        marker = json.loads((folder / "COMPLETE").read_text())
        sizes = {name: int(size) for name, size in marker["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return Verified([Problem("COMPLETE", f"unreadable ({err})")])
    entries: dict[str, dict] = {name: {"size": size} for name, size in sizes.items()}
    required: Required = ()
    has_checksums = (folder / CHECKSUMS).exists()
    if has_checksums:
        try:
            sums = json.loads((folder / CHECKSUMS).read_text())
            entries, required = sums["files"], sums.get("required", [])
            algorithm = sums["algorithm"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return Verified([Problem(CHECKSUMS, f"unreadable ({err})")])
        if algorithm != ALGORITHM:
            return Verified([Problem(CHECKSUMS, f"unknown algorithm {algorithm!r}")])
    problems = [Problem(entry, "missing (required)") for entry in missing(folder, required)]
    checked, total = 0, 0
    for name, entry in sorted(entries.items()):
        path, want = folder / name, int(entry["size"])
        try:
            size = path.stat().st_size
        except OSError:
            if not any(p.file == name for p in problems):
                problems.append(Problem(name, "missing"))
            continue
        if size != want:
            kind = "truncated" if size < want else "grown"
            problems.append(Problem(name, f"{kind} ({size} of {want} bytes)"))
            continue
        if digests and has_checksums:
            if digest_file(path)[1] != entry[ALGORITHM]:
                problems.append(Problem(name, f"checksum mismatch ({ALGORITHM})"))
                continue
        checked, total = checked + 1, total + size
    return Verified(problems, checked, total, time.perf_counter() - started, digests and has_checksums)
