"""What a background checkpoint write costs a Python-bound training thread, by how the write is done (issue 11.1).

    .venv/bin/python benchmarks/writer_gil.py [--mib 880] [--rounds 3]

On a GPU the training thread mostly runs Python (TRL's loop, kernel launches), so what matters is how much
of the GIL the writer thread takes. An AdamW-shaped state of ``--mib`` MiB (100 float32 tensors) is staged
by rlarith.training.async_save.capture, then written by a BackgroundWriter two ways, alternating which
goes first:
- streamed (what rlarith does): torch.save into a manifest.DigestingWriter, which hashes the bytes as
  they pass and starts their writeback every 64 MiB, with the GIL switch interval at 1 ms during the
  write (async_save.SWITCH_INTERVAL_S);
- streamed at Python's default switch interval (5 ms);
- path: torch.save into the path (torch's C++ writer), then the file read back once for its checksum.
Each is timed with the main thread idle (waiting) and busy (a pure-Python counting loop, the stand-in
for a Python-bound step): the table gives the write's seconds and the loop's rate during the write as a
share of its rate alone (1.00: the write took nothing from it). Written to benchmarks/results/writer_gil.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchenv import REPO, set_threads, write_results


def count_for(seconds: float) -> float:
    """Iterations per second of the stand-in Python loop, alone."""
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(1000):
            n += 1
    return n / (time.perf_counter() - started)


def one_write(
    state: dict, folder: Path, streams: bool, switch: float | None, busy: bool
) -> tuple[float, float]:
    """Seconds of one background write of ``state``, and the loop's iterations per second meanwhile."""
    import torch

    from rlarith.training import async_save
    from rlarith.training.async_save import BackgroundWriter, HostBuffers, Snapshot, capture

    async_save.SWITCH_INTERVAL_S = switch

    folder.mkdir(parents=True, exist_ok=True)
    snapshot = Snapshot(HostBuffers())
    with capture(snapshot):
        torch.save(state, folder / "optimizer.pt")
    snapshot.writes[:] = [w._replace(streams=streams) for w in snapshot.writes]
    writer = BackgroundWriter(rank=0, world_size=1)
    n, started = 0, time.perf_counter()
    writer.submit(snapshot, folder, None)
    while writer.busy:
        if busy:
            for _ in range(1000):
                n += 1
        else:
            time.sleep(0.005)
    elapsed = time.perf_counter() - started
    writer.wait()
    shutil.rmtree(folder)
    return elapsed, n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mib", type=int, default=880, help="size of the state (default: 880, AdamW of 110M)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp folder)")
    parser.add_argument(
        "--out", default=None, help="results file (default: benchmarks/results/writer_gil.md)"
    )
    args = parser.parse_args()
    set_threads(1)
    import torch

    from rlarith.training import async_save

    per = args.mib * 2**20 // 4 // 100
    state = {"state": {i: {"exp_avg": torch.randn(per)} for i in range(100)}}
    root = Path(tempfile.mkdtemp(prefix="writer-gil-", dir=args.dir))
    alone = count_for(1.0)
    rows: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    switch = async_save.SWITCH_INTERVAL_S
    modes = [
        ("streamed", True, switch),
        ("streamed, switch interval 5 ms", True, None),
        ("path", False, switch),
    ]
    for r in range(args.rounds):
        for name, streams, interval in modes[r % 3 :] + modes[: r % 3]:
            for busy in (False, True):
                seconds, rate = one_write(state, root / "w", streams, interval, busy)
                rows.setdefault((name, busy), []).append((seconds, rate / alone))
                print(f"round {r}: {name}, main thread {'busy' if busy else 'idle'}: {seconds:.2f} s, "
                      f"loop at {rate / alone:.2f} of alone", flush=True)  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)

    def spread(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    lines = [
        f"State: {args.mib} MiB of float32 in 100 tensors, written with fsync by a BackgroundWriter; "
        f"{args.rounds} rounds rotating the order; median (min-max). Disk: {args.dir or tempfile.gettempdir()}.",
        "",
        "| write | main thread | write seconds | Python loop rate during the write (vs alone) |",
        "|---|---|---|---|",
    ]
    for name, _, _ in modes:
        for busy in (False, True):
            got = rows[(name, busy)]
            rate = spread([g[1] for g in got]) if busy else ""
            lines.append(
                f"| {name} | {'busy' if busy else 'idle'} | {spread([g[0] for g in got])} | {rate} |"
            )
    body = "\n".join(lines)
    print(body)
    out = args.out or REPO / "benchmarks" / "results" / "writer_gil.md"
    print(
        f"written to {write_results(out, 'A background write against a Python-bound training thread', body)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
