"""Benchmark of rlarith.traces against plain JSON lines, on realistic synthetic GRPO records.

    .venv/bin/python benchmarks/traces_bench.py [--steps 1000] [--samples 64] [--group 8]

Prints markdown, also written to benchmarks/results/traces_bench.md with the machine, versions and date
(``--out``; benchmarks/traces.md explains the design with an earlier run's numbers): bytes per sample,
writer throughput and the cost of ``write_step`` per step next to a JSON-lines writer in the same run, read times, and the layout study
that chose the shard format (text: dictionary / prompt table / blocks; numbers: gzip level; HDF5 libver;
one HDF5 file per step instead of a journal).

Records: prompts in Qwen's chat format ("Compute 123 * 45. ..."), completions that are mostly numbers
(accuracy rises from 5% to 90% over the run, 3% are junk that fails extraction), digit token ids plus
<|im_end|>, rewards exact/partial/format, float32 group-normalised advantages, one metrics dict per step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import zstandard
from benchenv import REPO, write_results

from rlarith import traces
from rlarith.config import TraceConfig
from rlarith.traces.format import Block, write_shard

PROMPT = "<|im_start|>user\nCompute {a} * {b}. Reply with only the final number.<|im_end|>\n<|im_start|>assistant\n"
DIGIT_IDS = {str(d): 15 + d for d in range(10)}  # Qwen2 tokenises digits one by one: '0' is 15
EOS = 151645
META = {"rank": 0, "attempt": "1234.0", "attempt_seq": 1732590000123456789, "run_id": "positive_control"}


def synth_step(rng: random.Random, step: int, steps: int, n: int, group: int) -> dict[str, list]:
    acc = 0.05 + 0.85 * step / max(steps - 1, 1)
    cols: dict[str, list] = {
        k: []
        for k in (
            "prompt",
            "completion",
            "completion_ids",
            "key",
            "truth",
            "parsed",
            "reward/exact",
            "reward/partial",
            "reward/format",
            "reward_total",
            "advantage",
        )
    }
    for _ in range(n // group):
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        truth = a * b
        rewards = []
        for _ in range(group):
            u = rng.random()
            if u < acc:
                c = str(truth)
            elif u < 0.97:
                c = str(truth + rng.choice([-1, 1]) * rng.randint(1, 999))
            else:
                c = rng.choice(["", "The answer is", "12,34", "x"])
            parsed = int(c) if c.lstrip("-").isdigit() else None
            exact = float(parsed == truth)
            partial = 0.0
            if parsed is not None:
                p, t = str(abs(parsed))[::-1], str(truth)[::-1]
                partial = (sum(x == y for x, y in zip(p, t)) + 1) / (max(len(p), len(t)) + 1)
            cols["prompt"].append(PROMPT.format(a=a, b=b))
            cols["completion"].append(c)
            cols["completion_ids"].append([DIGIT_IDS.get(ch, 1000 + ord(ch)) for ch in c] + [EOS])
            cols["key"].append(f"*:{b}:{a}")
            cols["truth"].append(truth)
            cols["parsed"].append(parsed)
            cols["reward/exact"].append(exact)
            cols["reward/partial"].append(partial)
            cols["reward/format"].append(float(parsed is not None))
            cols["reward_total"].append(exact)
            rewards.append(exact)
        r = np.array(rewards)
        cols["advantage"] += np.float32((r - r.mean()) / (r.std() + 1e-4)).tolist()
    return cols


def metrics_of(cols: dict[str, list]) -> dict[str, float]:
    exact = float(np.mean(cols["reward/exact"]))
    return {"loss": 0.01 * exact, "reward": exact, "reward_std": 0.3, "kl": 0.0, "grad_norm": 1.5, "lr": 3e-4}


def jsonl_lines(step: int, t: float, cols: dict[str, list]) -> list[str]:
    """The baseline: one json.dumps per sample, with the same writer-added fields."""
    names = list(cols)
    return [
        json.dumps({"step": step, "time": t, **META, **dict(zip(names, row))}) + "\n"
        for row in zip(*cols.values())
    ]


def run_jsonl(path: Path, data: list[dict[str, list]], fsync: bool) -> list[float]:
    times = []
    with open(path, "w") as fh:
        for step, cols in enumerate(data):
            t0 = time.perf_counter()
            fh.writelines(jsonl_lines(step, time.time(), cols))
            fh.write(json.dumps({"step": step, "time": time.time(), **metrics_of(cols)}) + "\n")
            fh.flush()  # a logger that flushes each step, so a kill loses at most that step
            if fsync:
                os.fsync(fh.fileno())
            times.append(time.perf_counter() - t0)
    return times


def run_traces(
    directory: Path, data: list[dict[str, list]], fsync: bool, cfg: TraceConfig
) -> tuple[list[float], float]:
    w = traces.TraceWriter(directory, cfg=dataclasses.replace(cfg, fsync_steps=fsync), **META)
    times = []
    for step, cols in enumerate(data):
        t0 = time.perf_counter()
        w.write_step(step, cols)
        w.write_metrics(step, metrics_of(cols))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    w.close()
    return times, time.perf_counter() - t0


def du(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def ms(x: float) -> str:
    return f"{x * 1e3:.3f}"


def text_study(data: list[dict[str, list]], level: int) -> list[tuple[str, dict[str, float]]]:
    """Bytes per sample of each text column under the alternatives considered."""
    n = sum(len(c["prompt"]) for c in data)
    out = []

    def per_step(col: str, cctx: zstandard.ZstdCompressor, extra: int = 0) -> float:
        return (sum(len(cctx.compress("".join(c[col]).encode())) for c in data) + extra) / n

    plain = zstandard.ZstdCompressor(level=level)
    row: dict[str, float] = {}
    for col in ("prompt", "completion", "key"):
        row[col] = per_step(col, plain)
    out.append(("one frame per step, no dictionary", row))
    row = {}
    for col in ("prompt", "completion", "key"):
        raw = b"".join(dict.fromkeys(s.encode() for s in data[0][col]))
        d = zstandard.ZstdCompressionDict(raw, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        row[col] = per_step(
            col, zstandard.ZstdCompressor(level=level, dict_data=d, write_dict_id=False), len(raw)
        )
    out.append(("one frame per step, raw dictionary of step 0 (chosen)", row))
    row = {}
    for col in ("prompt", "completion", "key"):
        samples = [s.encode() for c in data[:500] for s in c[col]]
        d = zstandard.train_dictionary(4096, samples, level=level)
        cctx = zstandard.ZstdCompressor(level=level, dict_data=d, write_dict_id=False)
        row[col] = per_step(col, cctx, len(d.as_bytes()))
    out.append(("one frame per step, trained 4 KiB dictionary (needs 500 steps first)", row))
    row = {}
    for col in ("prompt", "completion", "key"):
        total, index = 0, []
        for c in data:
            uniq = list(dict.fromkeys(c[col]))
            total += len(plain.compress("".join(uniq).encode()))
            index += [uniq.index(s) for s in c[col]]
        row[col] = (total + len(zlib.compress(bytes(index), 6))) / n  # + the index, deflated as HDF5 would
    out.append(("distinct texts per step + an index per sample (prompt table)", row))
    for k in (10, 500):
        row = {}
        for col in ("prompt", "completion", "key"):
            total = 0
            for i in range(0, len(data), k):
                total += len(plain.compress("".join(s for c in data[i : i + k] for s in c[col]).encode()))
            row[col] = total / n
        out.append((f"one frame per {k} steps", row))
    return out


def numeric_study(directory: Path) -> list[tuple[str, float, float]]:
    """Shard size and write time of the numeric datasets under gzip levels and HDF5 libver."""
    shard = sorted(directory.glob("*.h5"))[0]
    arrays = {}
    with h5py.File(shard, "r") as h5:
        h5.visititems(
            lambda name, o: (
                arrays.__setitem__(name, o[()])
                if isinstance(o, h5py.Dataset)
                and not name.endswith(("/zstd", "/dict"))
                and o.dtype.kind != "O"
                else None
            )
        )
    rows = int(arrays["steps/count"].sum())
    out = []
    for libver, level in (("v110", 1), ("v110", 4), ("v110", 6), ("v110", 9), ("earliest", 6)):
        t0 = time.perf_counter()
        bio = io.BytesIO()
        with h5py.File(bio, "w", libver=libver) as h5:
            for name, a in arrays.items():
                if a.size == 0:
                    h5.create_dataset(name, data=a)
                    continue
                chunks = (min(len(a), 32768),) + a.shape[1:]
                h5.create_dataset(
                    name, data=a, chunks=chunks, shuffle=True, compression="gzip", compression_opts=level
                )
        out.append(
            (f"libver={libver}, shuffle+gzip {level}", len(bio.getvalue()) / rows, time.perf_counter() - t0)
        )
    return out


def hdf5_per_step_cost(data: list[dict[str, list]], repeat: int = 50) -> float:
    """The rejected design: every commit a small HDF5 file (built in memory, same datasets)."""
    w = traces.TraceWriter("unused", cfg=TraceConfig(enabled=False), **META)  # only its encoder
    times = []
    for i in range(repeat):
        block = Block(
            attrs=dict(META, seq_first=i, seq_last=i, zstd_level=10),
            step=np.array([i]),
            time=np.array([time.time()]),
            count=np.array([len(data[i]["prompt"])]),
            columns=w._encode(data[i]),
        )
        t0 = time.perf_counter()
        with h5py.File(f"bench-{i}", "w", driver="core", backing_store=False, libver="v110") as h5:
            write_shard(h5, block)
            h5.flush()
            h5.id.get_file_image()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jsonl_of(tr: traces.Traces) -> int:
    """Bytes of what the reader returns as JSON lines (records, then metrics rows): the compression ratio
    `rlarith traces summary` used to compute on every call (10 s at 2,000 steps), measured here instead."""
    size = sum(len(json.dumps(r)) + 1 for r in tr.records(all_attempts=True))
    for r in tr.metrics(all_attempts=True).to_dict("records"):
        r = {k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}
        size += len(json.dumps(r, default=lambda o: o.item())) + 1
    return size


class _Tee(io.StringIO):
    """stdout that is also kept, for the results file."""

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)
        return super().write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "traces_bench.md"))
    args = ap.parse_args()
    tee = _Tee()
    with contextlib.redirect_stdout(tee):
        run(args)
    title = "Trace writer: size per sample, write cost per step, reads"
    print(f"written to {write_results(args.out, title, tee.getvalue())}")


def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    data = [synth_step(rng, s, args.steps, args.samples, args.group) for s in range(args.steps)]
    n = args.steps * args.samples
    cfg = TraceConfig()
    root = Path(tempfile.mkdtemp(prefix="traces-bench-"))

    # Size and speed, JSONL and traces interleaved (twice each), so the machine's noise hits both alike.
    results: dict[str, list[float]] = {}
    closes = []
    for rep in range(2):
        for fsync in (False, True):
            results.setdefault(f"jsonl fsync={fsync}", []).extend(
                run_jsonl(root / f"j{rep}{fsync}.jsonl", data, fsync)
            )
            d = root / f"t{rep}{fsync}"
            times, close = run_traces(d, data, fsync, cfg)
            results.setdefault(f"traces fsync={fsync}", []).extend(times)
            closes.append(close)
    jsonl_bytes = (root / "j0False.jsonl").stat().st_size
    trace_dir = root / "t0False"
    trace_bytes = du(trace_dir)
    jsonl_zst = len(
        zstandard.ZstdCompressor(level=cfg.zstd_level).compress((root / "j0False.jsonl").read_bytes())
    )

    print(
        f"## Results ({args.steps} steps x {args.samples} samples, groups of {args.group}, zstd level {cfg.zstd_level})\n"
    )
    print("### Size\n")
    print("| format | bytes | bytes/sample | vs JSONL |")
    print("|---|---:|---:|---:|")
    print(
        f"| JSONL (`json.dumps` per sample + a metrics line per step) | {jsonl_bytes:,} | {jsonl_bytes / n:.1f} | 1x |"
    )
    print(
        f"| traces (HDF5 shards, this module) | {trace_bytes:,} | {trace_bytes / n:.1f} | **{jsonl_bytes / trace_bytes:.1f}x smaller** |"
    )
    print(
        f"| for scale: the JSONL file zstd'd whole, level {cfg.zstd_level} (no random access, no crash safety) "
        f"| {jsonl_zst:,} | {jsonl_zst / n:.1f} | {jsonl_bytes / jsonl_zst:.1f}x smaller |"
    )
    reread = jsonl_of(traces.open(trace_dir))
    print(
        f"\nThe records read back with `traces.open()`, as JSONL: {reread / trace_bytes:.1f}x the traces.\n"
    )

    print("### Write cost per step (write_step + write_metrics), same run, interleaved\n")
    print("| writer | mean ms/step | median | p99 | max | samples/s | vs JSONL (mean) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fsync in (False, True):
        base = statistics.mean(results[f"jsonl fsync={fsync}"])
        for name in (f"jsonl fsync={fsync}", f"traces fsync={fsync}"):
            t = sorted(results[name])
            mean = statistics.mean(t)
            label = name.replace("fsync=True", "+ fsync per step").replace("fsync=False", "")
            print(
                f"| {label} | {ms(mean)} | {ms(statistics.median(t))} | {ms(t[int(0.99 * len(t))])} | {ms(t[-1])} "
                f"| {args.samples / mean:,.0f} | {mean / base:.2f}x |"
            )
    print(
        f"\nSealing a shard ({cfg.shard_steps} steps) happens inside the write_step that starts the next one "
        f"(the max column); close() sealed the last one in {ms(statistics.median(closes))} ms (median)."
    )
    print(
        f"One commit as its own HDF5 file instead (rejected design): {ms(hdf5_per_step_cost(data))} ms/step median.\n"
    )

    tr = traces.open(trace_dir)
    print("### Reading (one Traces object, warm page cache)\n")
    print("| call | ms |")
    print("|---|---:|")
    mid = args.steps // 2
    for label, fn in (
        ("open() (index of every shard)", lambda: traces.open(trace_dir)),
        ("frame() all columns", lambda: tr.frame()),
        (
            "frame(columns=[reward/exact, advantage]) (no text decompressed)",
            lambda: tr.frame(columns=["reward/exact", "advantage"]),
        ),
        (f"frame(steps={mid}) one step, all columns", lambda: tr.frame(steps=mid)),
        ("by_step() (summary table)", lambda: tr.by_step()),
        ("seen_keys()", lambda: tr.seen_keys()),
        ("verify() (every dataset read, every frame decompressed)", lambda: tr.verify()),
        ("summary() (verify + by_step; no JSON encoding)", lambda: tr.summary()),
        ("the old summary's JSONL re-encoding alone (now here only)", lambda: jsonl_of(tr)),
    ):
        t0 = time.perf_counter()
        fn()
        print(f"| {label} | {(time.perf_counter() - t0) * 1e3:.1f} |")

    print("\n### Layout study: text columns, bytes per sample\n")
    print("| layout | prompt | completion | key | total |")
    print("|---|---:|---:|---:|---:|")
    for label, row in text_study(data, cfg.zstd_level):
        print(
            f"| {label} | {row['prompt']:.2f} | {row['completion']:.2f} | {row['key']:.2f} | {sum(row.values()):.2f} |"
        )
    print("\n### Layout study: numeric datasets of the first shard\n")
    print("| HDF5 storage | bytes/sample | write s |")
    print("|---|---:|---:|")
    for label, per, secs in numeric_study(trace_dir):
        print(f"| {label} | {per:.2f} | {secs:.3f} |")
    sizes: dict[str, int] = {}
    with h5py.File(sorted(trace_dir.glob("*.h5"))[0], "r") as h5:
        h5.visititems(
            lambda name, o: (
                sizes.__setitem__(name, o.id.get_storage_size()) if isinstance(o, h5py.Dataset) else None
            )
        )
        rows = int(h5["steps/count"][()].sum())
    print("\n### Where the bytes go (first shard, bytes/sample, largest first)\n")
    print("| dataset | bytes/sample |")
    print("|---|---:|")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:12]:
        print(f"| `{name}` | {size / rows:.2f} |")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
