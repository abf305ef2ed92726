"""What sealing and verifying a checkpoint costs: the checksum pass of ``seal`` and ``verify`` at resume.

    .venv/bin/python benchmarks/seal_cost.py [--checkpoint runs/x/checkpoints/checkpoint-8] [--mib 100 1024]

For each case, a staged folder is written (a copy of ``--checkpoint``, e.g. the tiny model's, and/or one
file of ``--mib`` MiB of random bytes), then ``seal`` and ``verify`` are timed (best of ``--rounds``; the
files are in the page cache, as they are right after the Trainer wrote them, so this is the CPU cost of
hashing plus the fsyncs). Also prints the raw hash speeds of XXH3-128 and the hashlib alternatives.
Paste the table into docs/run-directory.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import xxhash

from rlarith.checkpoints import checkpoint_path, seal, staging_dir, verify
from rlarith.manifest import CHECKSUMS


def hash_speeds(mib: int = 256) -> dict[str, float]:
    data = os.urandom(mib * 2**20)
    out = {}
    for name, make in [
        ("xxh3_128", xxhash.xxh3_128),
        ("sha256", hashlib.sha256),
        ("blake2b", hashlib.blake2b),
    ]:
        started = time.perf_counter()
        h = make()
        view = memoryview(data)
        for i in range(0, len(data), 8 * 2**20):
            h.update(view[i : i + 8 * 2**20])
        h.digest()
        out[name] = mib / 1024 / (time.perf_counter() - started)
    return out


def case(root: Path, source: Path | None, mib: int, rounds: int) -> tuple[int, float, float]:
    best_seal, best_verify, size = float("inf"), float("inf"), 0
    for i in range(rounds):
        run = root / f"r{i}"
        staged = staging_dir(run) / "checkpoint-1"
        if source is not None:
            shutil.copytree(source, staged, ignore=shutil.ignore_patterns("COMPLETE", CHECKSUMS))
        else:
            staged.mkdir(parents=True)
            (staged / "blob.bin").write_bytes(os.urandom(mib * 2**20))
        started = time.perf_counter()
        seal(staged, checkpoint_path(run, 1), {"step": 1})
        best_seal = min(best_seal, time.perf_counter() - started)
        result = verify(checkpoint_path(run, 1))
        assert result.ok
        best_verify, size = min(best_verify, result.seconds), result.bytes
        shutil.rmtree(run)
    return size, best_seal, best_verify


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="a sealed checkpoint to copy")
    parser.add_argument("--mib", type=int, nargs="*", default=[100], help="synthetic single-file sizes")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    speeds = hash_speeds()
    print("hash speed (GiB/s, one core): " + ", ".join(f"{k} {v:.2f}" for k, v in speeds.items()))
    print("| checkpoint | size | seal (s) | verify (s) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(f"copy of {args.checkpoint.name}", args.checkpoint, 0)] if args.checkpoint else []
        cases += [(f"one {mib} MiB file", None, mib) for mib in args.mib]
        for label, source, mib in cases:
            size, sealed, verified = case(Path(tmp), source, mib, args.rounds)
            print(f"| {label} | {size / 2**20:.1f} MiB | {sealed:.3f} | {verified:.3f} |")


if __name__ == "__main__":
    main()
