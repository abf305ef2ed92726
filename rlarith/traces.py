"""Per-step traces: every prompt, completion, reward and advantage of every step, on every rank.

Why: when a run does not learn, the traces are the only record of what the model saw and said. They are
written on the fly, compressed, crash-safe and resume-aware, and read back as pandas frames.

Layout (schema version 1; docs/traces.md is the reference, with a decode recipe needing only h5py+zstd)::

    traces/
      rank0000.<attempt>.steps00000000-00000499.c00000000.h5   sealed shard: one rank, one attempt, many steps
      pending/rank0000.<attempt>.00000500.journal              the steps since the last shard, append-only
      .staging/                                                shards being written; never read

A shard is columnar: one dataset per column (``samples/<name>/...``) holding every row of the shard, and
a ``steps`` table (step, time, first row, row count). Numeric columns are plain HDF5 datasets with
shuffle+gzip, which every HDF5 has (no plugin to carry). Text columns are one zstd frame per step,
concatenated in a ``uint8`` dataset with offsets, plus each sample's UTF-8 length; the frames share a
raw-content zstd dictionary made of the writer's first step, which carries the prompt template (-40% on
prompts). Result: ~38x smaller than JSONL of the same records; numbers and the alternatives measured
(a prompt table, trained dictionaries, blocks of steps) are in benchmarks/traces.md. Per-step frames
because a step is the unit of durability and of random access; blocks of ten steps would save ~1.6 B of
~13 B per sample.

Crash safety. HDF5 is not journaled and a file killed mid-write can be unreadable, so no HDF5 file is
written in place: a shard is written under ``.staging/``, fsynced, renamed into place (atomic), and the
directory fsynced. Between shards, each ``write_step`` / ``write_metrics`` appends one record to the
writer's journal in a single ``write``: ``magic, length, crc32, payload``. A kill can only
tear the last record, which then fails its length or checksum and is ignored with everything after it;
every complete record is already in the page cache and survives the process. So a SIGKILL at any moment
loses at most the step in flight, and every ``.h5`` file under its final name is complete. Every
``shard_steps`` steps (or ``shard_bytes``) and at ``close()`` the journal's records become a shard, and
only then is the journal deleted; readers skip journal records whose sequence numbers a shard of the same
rank and attempt covers, so the moment between the two is safe too. A new writer of a rank seals what
earlier attempts of that rank left in their journals (one writer per rank at a time, which a requeued
SLURM job guarantees). Per step this costs one append of ~9 KB instead of a new HDF5 file (12x slower).

Attempts. Each writer records its ``attempt`` id and ``attempt_seq`` (chronological). The default view
shows each step once, from the latest attempt (by ``attempt_seq``) that recorded it: after a resume that
is the attempt the final model descends from. ``all_attempts=True`` shows every copy.

Reading never decompresses what was not asked for: the index (``steps`` and attributes) comes first, then
only the requested columns' datasets, and only the row ranges and zstd frames of the selected steps.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import re
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import zstandard

from rlarith.config import TraceConfig

FORMAT = "rlarith-traces"
VERSION = 1
META_COLUMNS = ("step", "rank", "time", "attempt", "attempt_seq", "run_id")
# Known columns have a fixed kind, so that a step of all-None never changes a column's type.
KNOWN_KINDS = {
    "prompt": "text",
    "completion": "text",
    "key": "text",
    "completion_ids": "ids",
    "truth": "int",
    "parsed": "int",
    "reward_total": "float",
    "advantage": "float",
}
# Dataset names inside a column's group; a column name may not end in one of them (reward/exact is fine).
_RESERVED = ("value", "state", "len", "zstd", "zstd_off", "dict", "big_row", "big_value")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_STATE_NONE, _STATE_VALUE, _STATE_BIG = 0, 1, 2
_DICT_MAX = 16 * 1024  # raw-content dictionary: the first step's distinct texts, up to this many bytes
_CHUNK_ROWS = 32768  # shard chunk of a numeric column: 256 KiB of int64, ~500 steps of 64 samples
_GZIP = 6  # shuffle+gzip level of numeric columns in shards
_LIBVER = "v110"  # HDF5 >= 1.10 (2016): compact chunk indexes, ~3 KB less per dataset than "earliest"
_MAGIC = b"RLT1"
_RECORD = struct.Struct("<4sII")  # magic, payload length, crc32(payload)


class TraceError(ValueError):
    """A user-facing problem with traces (none found, unknown column, newer schema); the message says which."""


def _safe(attempt: str) -> str:
    """A filename-safe form of an attempt id; a hash suffix keeps two ids that sanitize alike apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", attempt)[:64]
    if safe != attempt or not safe:
        safe += "-" + hashlib.sha1(attempt.encode()).hexdigest()[:8]
    return safe


def _prefix(rank: int, attempt: str) -> str:
    return f"rank{int(rank):04d}.{_safe(attempt)}"


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# A block: the in-memory form of a journal record or of a shard, holding exactly the on-disk datasets.


@dataclass
class _Block:
    attrs: dict[str, Any]  # run_id, rank, attempt, attempt_seq, seq_first, seq_last, zstd_level
    step: np.ndarray  # int64[S]
    time: np.ndarray  # float64[S]
    count: np.ndarray  # int64[S]
    # column name -> (kind, {dataset name: array})
    columns: dict[str, tuple[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    m_step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    m_time: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    m_names: list[str] = field(default_factory=list)
    m_value: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float64))

    @property
    def rows(self) -> int:
        return int(self.count.sum())

    def payload_bytes(self) -> int:
        """Upper bound of this block's share of a shard: compressed text plus uncompressed numbers (the
        text dictionary is stored once per shard and not counted)."""
        arrays = [a for _, ds in self.columns.values() for k, a in ds.items() if k != "dict"]
        return sum(a.nbytes for a in arrays if a.dtype != object)


def _pack(block: _Block) -> bytes:
    """A block as a journal payload: a JSON header (small fields, array dtypes) then the arrays' bytes."""
    arrays: list[np.ndarray] = []
    columns = {}
    for name, (kind, ds) in block.columns.items():
        spec = {}
        for k, a in ds.items():
            if a.dtype == object:  # big ints, as decimal strings in the header
                spec[k] = ["str", [str(v) for v in a]]
            else:
                spec[k] = [a.dtype.str, len(a)]
                arrays.append(np.ascontiguousarray(a))
        columns[name] = [kind, spec]
    header = {
        "attrs": {k: (v if isinstance(v, str) else int(v)) for k, v in block.attrs.items()},
        "step": block.step.tolist(),
        "time": block.time.tolist(),
        "count": block.count.tolist(),
        "columns": columns,
        "m_step": block.m_step.tolist(),
        "m_time": block.m_time.tolist(),
        "m_names": block.m_names,
        "m_value": block.m_value.tolist(),
    }
    head = json.dumps(header).encode()
    return b"".join([struct.pack("<I", len(head)), head] + [a.tobytes() for a in arrays])


def _unpack(payload: bytes) -> _Block:
    (n,) = struct.unpack_from("<I", payload)
    h = json.loads(payload[4 : 4 + n])
    pos = 4 + n
    block = _Block(
        attrs=h["attrs"],
        step=np.array(h["step"], np.int64),
        time=np.array(h["time"], np.float64),
        count=np.array(h["count"], np.int64),
        m_step=np.array(h["m_step"], np.int64),
        m_time=np.array(h["m_time"], np.float64),
        m_names=h["m_names"],
        m_value=np.array(h["m_value"], np.float64).reshape(len(h["m_step"]), len(h["m_names"])),
    )
    for name, (kind, spec) in h["columns"].items():
        ds = {}
        for k, (dtype, arg) in spec.items():
            if dtype == "str":
                ds[k] = np.array(arg, dtype=object)
            else:
                ds[k] = np.frombuffer(payload, np.dtype(dtype), arg, pos)
                pos += ds[k].nbytes
        block.columns[name] = (kind, ds)
    return block


def _read_journal(path: Path) -> list[_Block]:
    """The journal's complete records, in order. A torn or damaged record (the one a kill interrupted)
    ends it: nothing after it can have been written by the same writer."""
    data = path.read_bytes()
    blocks, pos = [], 0
    while pos + _RECORD.size <= len(data):
        magic, n, crc = _RECORD.unpack_from(data, pos)
        payload = data[pos + _RECORD.size : pos + _RECORD.size + n]
        if magic != _MAGIC or len(payload) != n or zlib.crc32(payload) != crc:
            break
        blocks.append(_unpack(payload))
        pos += _RECORD.size + n
    return blocks


def _kind_of(name: str, values: list) -> str:
    if name in KNOWN_KINDS:
        return KNOWN_KINDS[name]
    if name.startswith("reward/"):
        return "float"
    first = next((v for v in values if v is not None), None)
    if isinstance(first, str):
        return "text"
    if isinstance(first, (list, tuple, np.ndarray)):
        return "ids"
    if isinstance(first, (bool, int, np.integer)):
        return "int"
    return "float"


def _encode_int(name: str, values: list) -> dict[str, np.ndarray]:
    if all(type(v) is int for v in values):  # fast path: plain ints (no None, no float)
        try:
            return {"value": np.asarray(values, np.int64), "state": np.ones(len(values), np.uint8)}
        except OverflowError:  # beyond int64: the slow path keeps it exactly
            pass
    value = np.zeros(len(values), np.int64)
    state = np.zeros(len(values), np.uint8)
    big_row: list[int] = []
    big_value: list[str] = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, float) and not v.is_integer():
            raise TypeError(f"traces: column {name!r} holds integers; got {v!r} at row {i}")
        v = int(v)
        if _INT64_MIN <= v <= _INT64_MAX:
            value[i], state[i] = v, _STATE_VALUE
        else:  # e.g. a 30-digit parsed answer: kept exactly, as decimal text on the side
            state[i] = _STATE_BIG
            big_row.append(i)
            big_value.append(str(v))
    out = {"value": value, "state": state}
    if big_row:
        out["big_row"] = np.asarray(big_row, np.int64)
        out["big_value"] = np.asarray(big_value, dtype=object)
    return out


class _TextCodec:
    """zstd with an optional raw-content dictionary."""

    def __init__(self, level: int, dict_bytes: bytes) -> None:
        self.dict_bytes = dict_bytes
        d = None
        if dict_bytes:
            d = zstandard.ZstdCompressionDict(dict_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        self.cctx = zstandard.ZstdCompressor(level=level, dict_data=d, write_dict_id=False)
        self.dctx = zstandard.ZstdDecompressor(dict_data=d)

    @staticmethod
    def make_dict(encoded: list[bytes]) -> bytes:
        out = b"".join(dict.fromkeys(encoded))[:_DICT_MAX]  # distinct texts: 8 prompts hold the template
        return out if len(out) >= 8 else b""


def _text_datasets(frames: list[bytes], lens: list[np.ndarray], dict_bytes: bytes) -> dict[str, np.ndarray]:
    off = np.zeros(len(frames) + 1, np.int64)
    off[1:] = np.cumsum([len(f) for f in frames])
    return {
        "len": np.concatenate(lens) if lens else np.zeros(0, np.int64),
        "zstd": np.frombuffer(b"".join(frames), np.uint8),
        "zstd_off": off,
        "dict": np.frombuffer(dict_bytes, np.uint8),
    }


def _merge(blocks: list[_Block], level: int) -> _Block:
    """One block holding the steps, rows and metrics of ``blocks`` in order (all of one rank and attempt)."""
    attrs = dict(blocks[0].attrs)
    attrs["seq_first"] = min(int(b.attrs["seq_first"]) for b in blocks)
    attrs["seq_last"] = max(int(b.attrs["seq_last"]) for b in blocks)
    out = _Block(
        attrs=attrs,
        step=np.concatenate([b.step for b in blocks]),
        time=np.concatenate([b.time for b in blocks]),
        count=np.concatenate([b.count for b in blocks]),
    )
    metrics_blocks, blocks = blocks, [b for b in blocks if len(b.step)]  # metrics-only records hold no rows
    rows = [b.rows for b in blocks]
    kinds: dict[str, str] = {}
    for b in blocks:
        for name, (kind, _) in b.columns.items():
            if kinds.setdefault(name, kind) != kind:
                raise TraceError(f"column {name!r} is {kinds[name]} in one step and {kind} in another")
    for name, kind in kinds.items():
        # A column a step did not have reads as NaN / None / [] / "" there.
        parts = [b.columns[name][1] if name in b.columns else None for b in blocks]
        if kind == "float":
            value = [p["value"] if p else np.full(r, np.nan) for p, r in zip(parts, rows)]
            out.columns[name] = (kind, {"value": np.concatenate(value)})
        elif kind == "int":
            ds = {
                "value": np.concatenate(
                    [p["value"] if p else np.zeros(r, np.int64) for p, r in zip(parts, rows)]
                ),
                "state": np.concatenate(
                    [p["state"] if p else np.zeros(r, np.uint8) for p, r in zip(parts, rows)]
                ),
            }
            base = np.cumsum([0] + rows)
            big = [
                (p["big_row"] + base[i], p["big_value"]) for i, p in enumerate(parts) if p and "big_row" in p
            ]
            if big:
                ds["big_row"] = np.concatenate([r for r, _ in big])
                ds["big_value"] = np.concatenate([v for _, v in big])
            out.columns[name] = (kind, ds)
        elif kind == "ids":
            lens = [p["len"] if p else np.zeros(r, np.int64) for p, r in zip(parts, rows)]
            vals = [p["value"] if p else np.zeros(0, np.int64) for p in parts]
            out.columns[name] = (kind, {"len": np.concatenate(lens), "value": np.concatenate(vals)})
        else:  # text: frames are copied as they are when they share the dictionary (always, but for reuse)
            target = next((p["dict"].tobytes() for p in parts if p), b"")
            codec = _TextCodec(level, target)
            frames: list[bytes] = []
            lens = []
            for p, b, r in zip(parts, blocks, rows):
                if p is None:
                    frames += [codec.cctx.compress(b"")] * len(b.step)
                    lens.append(np.zeros(r, np.int64))
                    continue
                blob, off = p["zstd"], p["zstd_off"]
                fs = [blob[off[j] : off[j + 1]].tobytes() for j in range(len(off) - 1)]
                if p["dict"].tobytes() != target:  # an attempt id reused by a new writer: one dictionary
                    dctx = _TextCodec(level, p["dict"].tobytes()).dctx
                    fs = [codec.cctx.compress(dctx.decompress(f)) for f in fs]
                frames += fs
                lens.append(p["len"])
            out.columns[name] = (kind, _text_datasets(frames, lens, target))
    blocks = metrics_blocks
    names = list(dict.fromkeys(n for b in blocks for n in b.m_names))
    if names:
        values = []
        for b in blocks:
            v = np.full((len(b.m_step), len(names)), np.nan)
            for k, n in enumerate(b.m_names):
                v[:, names.index(n)] = b.m_value[:, k]
            values.append(v)
        out.m_step = np.concatenate([b.m_step for b in blocks])
        out.m_time = np.concatenate([b.m_time for b in blocks])
        out.m_names, out.m_value = names, np.concatenate(values)
    return out


def _write_shard(h5: h5py.File, block: _Block) -> None:
    """Every dataset of ``block`` into an empty file: numbers chunked with shuffle+gzip, zstd blobs chunked."""

    def put(where: str, arr: np.ndarray) -> None:
        if arr.dtype == object:  # big ints as decimal strings
            h5.create_dataset(where, data=arr.astype(str).astype(object), dtype=h5py.string_dtype())
        elif arr.size == 0 or where.endswith(("/dict", "/zstd")):
            # zstd frames are compressed already; contiguous storage holds exactly their bytes (a chunked
            # dataset would pad its last chunk) and still reads just the byte range asked for.
            h5.create_dataset(where, data=arr)
        else:
            chunks = (min(len(arr), _CHUNK_ROWS),) + arr.shape[1:]
            h5.create_dataset(
                where, data=arr, chunks=chunks, shuffle=True, compression="gzip", compression_opts=_GZIP
            )

    a = block.attrs
    h5.attrs.update(
        format=FORMAT,
        version=VERSION,
        run_id=str(a["run_id"]),
        rank=np.int64(a["rank"]),
        attempt=str(a["attempt"]),
        attempt_seq=np.int64(a["attempt_seq"]),
        seq_first=np.int64(a["seq_first"]),
        seq_last=np.int64(a["seq_last"]),
        zstd_level=np.int64(a["zstd_level"]),
        columns=json.dumps({n: k for n, (k, _) in block.columns.items()}),
    )
    start = np.r_[0, np.cumsum(block.count)[:-1]].astype(np.int64) if len(block.count) else block.count
    for name, arr in (("step", block.step), ("time", block.time), ("start", start), ("count", block.count)):
        put(f"steps/{name}", arr)
    for name, (_, datasets) in block.columns.items():
        for ds_name, arr in datasets.items():
            put(f"samples/{name}/{ds_name}", arr)
    put("metrics/step", block.m_step)
    put("metrics/time", block.m_time)
    put("metrics/value", block.m_value.reshape(len(block.m_step), len(block.m_names)))
    h5["metrics"].attrs["names"] = json.dumps(block.m_names)


def _seal(directory: Path, blocks: list[_Block], level: int) -> Path:
    """Records into one shard: written under .staging/, fsynced, renamed into place, directory fsynced."""
    block = _merge(blocks, level)
    a = block.attrs
    steps = np.concatenate([block.step, block.m_step])
    name = f"{_prefix(a['rank'], a['attempt'])}.steps{steps.min():08d}-{steps.max():08d}.c{a['seq_first']:08d}.h5"
    tmp = directory / ".staging" / f"{name}.tmp"
    with h5py.File(tmp, "w", libver=_LIBVER, locking=False) as h5:
        _write_shard(h5, block)
    _fsync_path(tmp)
    os.replace(tmp, directory / name)
    _fsync_path(directory)  # the shard's name must be durable before the journal it replaces goes
    return directory / name


def _check_version(h5: h5py.File, path: Path) -> None:
    if int(h5.attrs["version"]) > VERSION:
        version = int(h5.attrs["version"])
        raise TraceError(f"{path} has trace schema {version}; this rlarith reads up to {VERSION}: upgrade it")


def _shard_seqs(directory: Path, prefix: str) -> list[tuple[int, int]]:
    out = []
    for path in directory.glob(f"{prefix}.steps*.h5"):
        with h5py.File(path, "r", locking=False) as h5:
            out.append((int(h5.attrs["seq_first"]), int(h5.attrs["seq_last"])))
    return out


def _is_covered(seq: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= seq <= hi for lo, hi in ranges)


# ----------------------------------------------------------------------------------------------------------
# Writing


class TraceWriter:
    """Writes the traces of one rank of one attempt; one per process. ``close()`` may be called from a
    signal handler: if it interrupts a write, it is carried out when that write returns."""

    def __init__(
        self,
        directory: str | Path,
        *,
        run_id: str,
        rank: int,
        attempt: str,
        attempt_seq: int,
        cfg: TraceConfig,
        fsync_steps: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.cfg = cfg
        # Records survive a killed process without fsync (the page cache outlives it); fsync_steps makes
        # each step survive a crashed node too, for one fsync per step. Shards are always fsynced.
        self.fsync_steps = fsync_steps
        self.prefix = _prefix(rank, attempt)
        self._attrs = {
            "run_id": run_id,
            "rank": rank,
            "attempt": attempt,
            "attempt_seq": attempt_seq,
            "zstd_level": cfg.zstd_level,
        }
        self._lock = threading.RLock()
        self._busy = self._close_requested = False
        self._closed = not cfg.enabled  # disabled: every call is a no-op
        self._pending: list[_Block] = []
        self._pending_steps = self._pending_bytes = 0
        self._journals: list[Path] = []
        self._fd: int | None = None
        self._last_step: int | None = None
        self._warned = False
        self._kinds: dict[str, str] = {}
        self._codecs: dict[str, _TextCodec] = {}
        self._seq = 0
        if cfg.enabled:
            (self.directory / ".staging").mkdir(parents=True, exist_ok=True)
            (self.directory / "pending").mkdir(parents=True, exist_ok=True)
            self._recover()

    # -- the trainer's calls --------------------------------------------------------------------------------

    def write_step(
        self, step: int, samples: dict[str, list], metrics: dict[str, float] | None = None
    ) -> None:
        """Record one generation batch (columns of equal length) as ``step``; durable when this returns."""
        with self._lock:
            if not self.cfg.enabled:
                return
            self._closed = False  # a write after close() (say, from a preemption handler) opens a new journal
            if self._last_step is not None and step < self._last_step and not self._warned:
                # Recorded anyway: a trace writer never stops training. Two batches of one step both show.
                warnings.warn(
                    f"traces: step {step} after step {self._last_step}; steps should not go back",
                    stacklevel=2,
                )
                self._warned = True
            self._busy = True
            try:
                block = self._new_block(step, samples)
                if metrics:
                    self._add_metrics(block, step, metrics)
                # Roll over before a new step rather than after one, so that the metrics of a shard's last
                # step, which come after its samples, land in the same shard.
                if self._pending_steps >= self.cfg.shard_steps or self._pending_bytes >= self.cfg.shard_bytes:
                    self._seal()
                self._commit(block)
                self._last_step = step
                self._pending_steps += 1
            finally:
                self._busy = False
            if self._close_requested:
                self.close()

    def write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Record logged metrics of ``step``; they may come after (or without) its samples."""
        with self._lock:
            if not self.cfg.enabled:
                return
            self._closed = False
            self._busy = True
            try:
                block = self._new_block(None, {})
                self._add_metrics(block, step, metrics)
                if block.m_names:
                    self._commit(block)
            finally:
                self._busy = False
            if self._close_requested:
                self.close()

    def close(self) -> None:
        """Seal what is pending into a shard. Idempotent; a later write starts a new journal."""
        with self._lock:
            if self._closed:
                return
            if self._busy:  # a signal handler interrupted a write: that write closes when it is done
                self._close_requested = True
                return
            self._busy = True
            try:
                self._seal()
                self._closed = True
            finally:
                self._busy = False

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------------

    def _new_block(self, step: int | None, samples: dict[str, list]) -> _Block:
        steps = np.zeros(0, np.int64) if step is None else np.array([step], np.int64)
        attrs = dict(self._attrs, seq_first=self._seq, seq_last=self._seq)
        block = _Block(
            attrs=attrs, step=steps, time=np.full(len(steps), time.time()), count=np.zeros(0, np.int64)
        )
        if step is not None:
            block.count = np.array([_n_rows(samples)], np.int64)
            block.columns = self._encode(samples)
        return block

    def _add_metrics(self, block: _Block, step: int, metrics: dict[str, float]) -> None:
        names, values = [], []
        for k, v in metrics.items():
            try:
                values.append(float(v))
                names.append(str(k))
            except (TypeError, ValueError):
                warnings.warn(f"traces: metric {k!r} is not a number ({v!r}); not recorded", stacklevel=3)
        if names:
            block.m_step, block.m_time = np.array([step], np.int64), np.array([time.time()])
            block.m_names, block.m_value = names, np.array([values], np.float64)

    def _encode(self, samples: dict[str, list]) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
        out = {}
        for name, values in samples.items():
            if (
                name in META_COLUMNS
                or not name
                or name.split("/")[-1] in _RESERVED
                or name.startswith("len(")
            ):
                raise ValueError(f"traces: {name!r} cannot be a sample column name (reserved)")
            values = values.tolist() if hasattr(values, "tolist") else list(values)
            kind = self._kinds.setdefault(name, _kind_of(name, values))
            if kind == "float":
                ds = {"value": np.array([math.nan if v is None else float(v) for v in values], np.float64)}
            elif kind == "int":
                ds = _encode_int(name, values)
            elif kind == "ids":
                seqs = [np.asarray(v if v is not None else [], np.int64).reshape(-1) for v in values]
                ds = {
                    "len": np.array([len(s) for s in seqs], np.int64),
                    "value": np.concatenate(seqs) if seqs else np.zeros(0, np.int64),
                }
            else:
                bad = next((v for v in values if not isinstance(v, str)), "")
                if not isinstance(bad, str):
                    raise TypeError(f"traces: column {name!r} holds text; got {type(bad).__name__} {bad!r}")
                encoded = [v.encode("utf-8", "surrogatepass") for v in values]
                if name not in self._codecs and any(encoded):  # the dictionary: this writer's first texts
                    self._codecs[name] = _TextCodec(self.cfg.zstd_level, _TextCodec.make_dict(encoded))
                codec = self._codecs.get(name) or _TextCodec(self.cfg.zstd_level, b"")
                lens = np.array([len(e) for e in encoded], np.int64)
                ds = _text_datasets([codec.cctx.compress(b"".join(encoded))], [lens], codec.dict_bytes)
            out[name] = (kind, ds)
        return out

    def _commit(self, block: _Block) -> None:
        """Append one record to the journal in one write, then fsync; a failed write is cut back off."""
        payload = _pack(block)
        record = _RECORD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload
        if self._fd is None:
            path = self.directory / "pending" / f"{self.prefix}.{self._seq:08d}.journal"
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._journals.append(path)
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync_steps:
                os.fsync(self._fd)
        except OSError:
            try:  # e.g. disk full: a torn record would hide every later one, so remove it
                os.ftruncate(self._fd, size)
            except OSError:  # cannot: start a new journal, the torn one ends this one
                os.close(self._fd)
                self._fd = None
            raise
        self._seq += 1
        self._pending.append(block)
        self._pending_bytes += block.payload_bytes()

    def _seal(self) -> None:
        if self._pending:
            _seal(self.directory, self._pending, self.cfg.zstd_level)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for path in self._journals:
            path.unlink(missing_ok=True)
        self._journals, self._pending, self._pending_steps, self._pending_bytes = [], [], 0, 0

    def _recover(self) -> None:
        """Clear this rank's staging debris; seal what this rank's earlier attempts (or a previous writer
        under this very attempt id) left in journals; number commits after this attempt's last."""
        rank = self.prefix.split(".", 1)[0] + "."
        for tmp in (self.directory / ".staging").glob(rank + "*"):
            tmp.unlink(missing_ok=True)
        mine = (self._attrs["attempt_seq"], self._attrs["attempt"])
        by_prefix: dict[str, list[tuple[Path, list[_Block]]]] = {}
        for path in sorted((self.directory / "pending").glob(rank + "*.journal")):
            prefix = path.name.rsplit(".", 2)[0]  # <prefix>.<first commit>.journal
            by_prefix.setdefault(prefix, []).append((path, _read_journal(path)))
        for prefix, journals in by_prefix.items():
            blocks = [b for _, bs in journals for b in bs]
            if blocks and (int(blocks[0].attrs["attempt_seq"]), blocks[0].attrs["attempt"]) > mine:
                continue  # a later attempt's: not ours to touch
            covered = _shard_seqs(self.directory, prefix)
            blocks = [b for b in blocks if not _is_covered(int(b.attrs["seq_first"]), covered)]
            if blocks:
                _seal(self.directory, blocks, self.cfg.zstd_level)
            for path, _ in journals:
                path.unlink()
        self._seq = max((last for _, last in _shard_seqs(self.directory, self.prefix)), default=-1) + 1


def _n_rows(samples: dict[str, list]) -> int:
    lengths = {name: len(values) for name, values in samples.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"traces: columns must have equal lengths; got {lengths}")
    return next(iter(lengths.values()), 0)


# ----------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Source:
    """A shard (read through h5py on demand) or a journal's uncovered records (merged in memory)."""

    path: Path
    sealed: bool
    rank: int
    attempt: str
    attempt_seq: int
    run_id: str
    seq_first: int
    seq_last: int
    columns: dict[str, str]
    size: int
    block: _Block | None = None  # journals only

    def open(self) -> Any:
        return h5py.File(self.path, "r", locking=False) if self.block is None else _BlockView(self.block)

    def metrics(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        if self.block is not None:
            b = self.block
            return b.m_names, b.m_step, b.m_time, b.m_value
        with h5py.File(self.path, "r", locking=False) as h5:
            names = json.loads(h5["metrics"].attrs["names"])
            step = h5["metrics/step"][()]
            return names, step, h5["metrics/time"][()], h5["metrics/value"][()].reshape(len(step), len(names))


class _BlockView:
    """An in-memory block behind the same ``src["samples/<name>"]["<dataset>"]`` paths as an HDF5 file."""

    def __init__(self, block: _Block) -> None:
        self.block = block

    def __getitem__(self, path: str) -> dict[str, np.ndarray]:
        return self.block.columns[path.split("/", 1)[1]][1]

    def __enter__(self) -> _BlockView:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_INDEX_COLUMNS = ["step", "time", "start", "count", "j", "source", "rank", "attempt", "attempt_seq", "run_id"]


def _scan(directory: Path) -> tuple[list[_Source], pd.DataFrame]:
    """Every shard and journal, minus journal records a shard already covers, and the table of their steps
    (one row per step and source: where its rows are, and whose they are), in commit order."""
    # Journals before shards: a journal sealed meanwhile was either read here (and its shard, listed
    # after, covers it) or already deleted (and then its shard was renamed in before we list shards).
    journals = []
    for path in sorted(directory.glob("pending/*.journal")):
        try:
            journals.append((path, _read_journal(path), path.stat().st_size))
        except FileNotFoundError:
            continue
    sources: list[_Source] = []
    tables = []
    for path in sorted(directory.glob("*.h5")):
        try:
            with h5py.File(path, "r", locking=False) as h5:
                if h5.attrs.get("format") != FORMAT:
                    warnings.warn(f"traces: skipping {path}: not a trace file", stacklevel=3)
                    continue
                _check_version(h5, path)
                a = h5.attrs
                src = _Source(
                    path=path,
                    sealed=True,
                    rank=int(a["rank"]),
                    attempt=str(a["attempt"]),
                    attempt_seq=int(a["attempt_seq"]),
                    run_id=str(a["run_id"]),
                    seq_first=int(a["seq_first"]),
                    seq_last=int(a["seq_last"]),
                    columns=json.loads(a["columns"]),
                    size=path.stat().st_size,
                )
                tables.append({k: h5[f"steps/{k}"][()] for k in ("step", "time", "start", "count")})
        except OSError as err:  # never expected: shards appear complete or not at all
            warnings.warn(f"traces: skipping unreadable {path} ({err})", stacklevel=3)
            continue
        sources.append(src)
    covered: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for s in sources:
        covered.setdefault((s.rank, s.attempt), []).append((s.seq_first, s.seq_last))
    for path, blocks, size in journals:
        if blocks:
            a = blocks[0].attrs
            ranges = covered.get((int(a["rank"]), a["attempt"]), [])
            blocks = [b for b in blocks if not _is_covered(int(b.attrs["seq_first"]), ranges)]
        if not blocks:
            continue
        block = _merge(blocks, 1)
        a = block.attrs
        src = _Source(
            path=path,
            sealed=False,
            rank=int(a["rank"]),
            attempt=a["attempt"],
            attempt_seq=int(a["attempt_seq"]),
            run_id=a["run_id"],
            seq_first=int(a["seq_first"]),
            seq_last=int(a["seq_last"]),
            columns={n: k for n, (k, _) in block.columns.items()},
            size=size,
            block=block,
        )
        sources.append(src)
        start = np.r_[0, np.cumsum(block.count)[:-1]].astype(np.int64) if len(block.count) else block.count
        tables.append({"step": block.step, "time": block.time, "start": start, "count": block.count})
    order = sorted(
        range(len(sources)), key=lambda i: (sources[i].attempt_seq, sources[i].attempt, sources[i].seq_first)
    )
    sources, tables = [sources[i] for i in order], [tables[i] for i in order]
    frames = []
    for i, (s, t) in enumerate(zip(sources, tables)):
        df = pd.DataFrame(t)
        df["j"], df["source"] = np.arange(len(df)), i
        df["rank"], df["attempt"], df["attempt_seq"], df["run_id"] = (
            s.rank,
            s.attempt,
            s.attempt_seq,
            s.run_id,
        )
        frames.append(df)
    index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_INDEX_COLUMNS)
    types = {"step": np.int64, "time": np.float64, "start": np.int64, "count": np.int64, "source": np.int64}
    return sources, index.astype(dict(types, rank=np.int64, attempt_seq=np.int64))


def _latest(df: pd.DataFrame, order: str) -> pd.DataFrame:
    """The default view: the rows of each step that the latest attempt recording it (by attempt_seq, then
    id) wrote, on every rank."""
    if df.empty:
        return df
    ordered = df.sort_values(["step", "attempt_seq", "attempt", order], kind="stable")
    winner = ordered.drop_duplicates("step", keep="last").set_index("step")["attempt"]
    return ordered[ordered["attempt"].to_numpy() == winner.reindex(ordered["step"]).to_numpy()]


def _as_set(x: Any) -> Any:
    if x is None or isinstance(x, range):
        return x
    if isinstance(x, (str, int, np.integer)):
        return {x}
    return set(x)


def _match(series: pd.Series, wanted: Any) -> np.ndarray:
    if isinstance(wanted, range):  # without materialising range(0, 10**9)
        v = series.to_numpy(np.int64)
        lo, hi = (wanted.start, wanted.stop) if wanted.step > 0 else (wanted.stop, wanted.start)
        inside = (v >= lo) & (v < hi) if wanted.step > 0 else (v > lo) & (v <= hi)
        return inside & ((v - wanted.start) % wanted.step == 0)
    return series.isin(list(wanted)).to_numpy()


def _runs(starts: np.ndarray, counts: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges covering the given ascending ranges, so reads touch only those."""
    out: list[tuple[int, int]] = []
    for s, c in zip(starts.tolist(), counts.tolist()):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + c)
        elif c:
            out.append((s, s + c))
    return out


def _take(ds: Any, runs: list[tuple[int, int]]) -> np.ndarray:
    if not runs:
        return np.zeros(0, ds.dtype)
    return np.concatenate([ds[lo:hi] for lo, hi in runs])


def _rows_of(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The numbers start..start+count-1 of each range, concatenated."""
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    return np.repeat(starts - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(total)


def _read_text(g: Any, js: np.ndarray, counts: np.ndarray, lens: np.ndarray) -> list[str]:
    """The strings of steps ``js`` (ascending) of one text column: consecutive frames are read in one go,
    and no other frame is decompressed."""
    dctx = _TextCodec(1, g["dict"][()].tobytes()).dctx
    off = g["zstd_off"][()]
    per_step = iter(np.split(lens, np.cumsum(counts)[:-1]) if len(counts) else [])
    texts: list[str] = []
    for lo, hi in _runs(js, np.ones(len(js), np.int64)):
        span = g["zstd"][off[lo] : off[hi]].tobytes()
        for j in range(lo, hi):
            raw = dctx.decompress(span[off[j] - off[lo] : off[j + 1] - off[lo]])
            ends = np.cumsum(next(per_step)).tolist()
            texts += [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip([0] + ends[:-1], ends)]
    return texts


def _strings(ds: Any) -> list[str]:
    return list(ds.asstr()[()]) if isinstance(ds, h5py.Dataset) else list(ds)


class Traces:
    """The traces in one directory. The index is read when the object is made: ``open()`` again to see
    steps written since. Views: by default each step once, from the latest attempt that recorded it."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._sources, self._index = _scan(self.directory)

    # -- public ---------------------------------------------------------------------------------------------

    @property
    def columns(self) -> dict[str, str]:
        """Sample columns and their kinds (``text``, ``ids``, ``int``, ``float``) across all files."""
        out: dict[str, str] = {}
        for s in self._sources:
            out.update(s.columns)
        return out

    def frame(
        self,
        steps: int | Iterable[int] | None = None,
        ranks: int | Iterable[int] | None = None,
        attempts: str | Iterable[str] | None = None,
        columns: Iterable[str] | None = None,
        all_attempts: bool = False,
    ) -> pd.DataFrame:
        """One row per sample, ordered by step, rank, attempt: the meta columns (step, rank, time, attempt,
        attempt_seq, run_id), then the requested sample columns (default: all). ``len(<column>)`` is a
        text column's UTF-8 bytes or an ids column's token count, read without decompressing any text.
        With ``attempts``, the default view chooses among those attempts only. Ints are pandas ``Int64``
        (``<NA>`` for None), or Python ints in an object column when one is beyond int64."""
        select = (steps, ranks, attempts, all_attempts)
        return _to_frame(*self._read_fresh(select, self._column_list(columns)))

    def __iter__(self) -> Iterator[dict]:
        """Records (dicts of plain Python values, None for missing) of the default view."""
        return self.records()

    def records(self, all_attempts: bool = False) -> Iterator[dict]:
        """Like iterating, optionally over every attempt's copy. Reads 256 step blocks at a time."""
        sel = self._select(None, None, None, all_attempts)
        names = self._column_list(None)
        for lo in range(0, len(sel), 256):
            yield from _records(*self._read(sel.iloc[lo : lo + 256], names))

    def metrics(self, all_attempts: bool = False) -> pd.DataFrame:
        """Logged metrics: one row per (step, rank, attempt), or, by default, per (step, rank) from the
        latest attempt that logged that step. Metrics sent twice for a step merge, later values winning."""
        meta = ["step", "rank", "attempt", "attempt_seq", "run_id", "time"]
        parts = []
        for i, s in enumerate(self._sources):
            names, step, t, values = s.metrics()
            if not len(step):
                continue
            df = pd.DataFrame(values, columns=names)
            df.insert(0, "step", step)
            df.insert(1, "time", t)
            df["rank"], df["attempt"], df["attempt_seq"], df["run_id"] = (
                s.rank,
                s.attempt,
                s.attempt_seq,
                s.run_id,
            )
            df["source"] = i  # sources are in commit order, and rows within one too
            parts.append(df)
        if not parts:
            return pd.DataFrame(columns=meta)
        df = pd.concat(parts, ignore_index=True)
        names = [c for c in df.columns if c not in meta and c != "source"]
        df = df.groupby(["step", "rank", "attempt"], sort=False, as_index=False).last()  # last non-NaN wins
        if not all_attempts:
            df = _latest(df, "source")
        df = df.sort_values(["step", "rank", "attempt_seq", "attempt"], kind="stable")
        return df[meta + names].reset_index(drop=True)

    def seen_keys(self) -> set[str]:
        """Every problem key in the traces, every attempt and rank (for evaluation's contamination check)."""
        if "key" not in self.columns:
            return set()
        out, _ = self._read_fresh((None, None, None, True), ["key"])
        return {k for k in out["key"] if k is not None}

    def summary(self) -> dict:
        """Steps, samples, bytes on disk, compression ratio against JSONL of the same records and metrics
        (``json.dumps`` per line, as a plain logger writes them), and reward and accuracy by step."""
        default = self._select(None, None, None, False)
        every = self._select(None, None, None, True)
        jsonl = sum(len(json.dumps(r)) + 1 for r in self.records(all_attempts=True))
        for r in self.metrics(all_attempts=True).to_dict("records"):
            r = {k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}
            jsonl += len(json.dumps(r, default=lambda o: o.item())) + 1
        size = sum(s.size for s in self._sources)
        return {
            "directory": str(self.directory),
            "steps": int(default["step"].nunique()),
            "samples": int(default["count"].sum()),
            "samples_all_attempts": int(every["count"].sum()),
            "ranks": sorted({s.rank for s in self._sources}),
            "attempts": list(dict.fromkeys(s.attempt for s in self._sources)),  # chronological
            "shards": sum(s.sealed for s in self._sources),
            "journals": sum(not s.sealed for s in self._sources),
            "bytes": size,
            "jsonl_bytes": jsonl,
            "compression_ratio": jsonl / size if size else math.nan,
            "bytes_per_sample": size / max(int(every["count"].sum()), 1),
            "by_step": self.by_step(),
        }

    def by_step(self) -> pd.DataFrame:
        """Per step of the default view: samples, the mean of each reward column, accuracy (mean of
        reward/exact, else parsed == truth), extraction failures (share of parsed None), mean completion
        length (tokens; UTF-8 bytes without completion_ids). Reads no text."""
        cols = self.columns
        want = [c for c in cols if c.startswith("reward")] + [c for c in ("parsed", "truth") if c in cols]
        if cols.get("completion_ids") == "ids":
            want.append("len(completion_ids)")
        elif cols.get("completion") == "text":
            want.append("len(completion)")
        df = self.frame(columns=want)
        out = pd.DataFrame({"step": df["step"]})
        for c in want:
            if c.startswith("reward"):
                out[c] = df[c]
        if "reward/exact" in df:
            out["accuracy"] = df["reward/exact"]
        elif "parsed" in df and "truth" in df:
            out["accuracy"] = (df["parsed"] == df["truth"]).fillna(False).astype(float)
        if "parsed" in df:
            out["extraction_failure"] = df["parsed"].isna().astype(float)
        for c in ("len(completion_ids)", "len(completion)"):
            if c in df:
                out["completion_len"] = df[c].astype(float)
        g = out.groupby("step")
        res = g.mean()
        res.insert(0, "samples", g.size())
        return res.reset_index()

    # -- internals ------------------------------------------------------------------------------------------

    def _select(self, steps: Any, ranks: Any, attempts: Any, all_attempts: bool) -> pd.DataFrame:
        df = self._index
        if attempts is not None:
            df = df[_match(df["attempt"], _as_set(attempts))]
        if not all_attempts:
            df = _latest(df, "source")
        for col, wanted in (("step", steps), ("rank", ranks)):
            if wanted is not None:
                df = df[_match(df[col], _as_set(wanted))]
        return df.sort_values(["step", "rank", "attempt_seq", "attempt", "source"], kind="stable")

    def _column_list(self, columns: Iterable[str] | None) -> list[str]:
        known = self.columns
        if columns is None:
            return list(known)
        out = []
        for c in [columns] if isinstance(columns, str) else list(columns):
            if c in META_COLUMNS:
                continue
            base = c[4:-1] if c.startswith("len(") and c.endswith(")") else c
            if base not in known or (base != c and known[base] not in ("text", "ids")):
                raise TraceError(
                    f"no column {c!r} in {self.directory}; columns: {', '.join(known) or 'none'}"
                )
            out.append(c)
        return out

    def _read_fresh(self, select: tuple, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """``_read`` of a selection; if a journal was sealed into a shard since the index was read, the
        index is read again, once."""
        try:
            return self._read(self._select(*select), names)
        except FileNotFoundError:
            self._sources, self._index = _scan(self.directory)
            return self._read(self._select(*select), names)

    def _read(self, sel: pd.DataFrame, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """The selected step blocks' rows, in order, as raw columns: arrays (float, len), object arrays
        (text, ids), [values, states, {row: big int}] (int). Only ``names`` are read."""
        counts = sel["count"].to_numpy(np.int64)
        n = int(counts.sum())
        out_start = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64) if len(counts) else counts
        known = self.columns
        kinds = {c: ("len" if c.startswith("len(") else known[c]) for c in names}
        out: dict[str, Any] = {c: np.repeat(sel[c].to_numpy(), counts) for c in META_COLUMNS}
        for c, kind in kinds.items():
            if kind == "float":
                out[c] = np.full(n, np.nan)
            elif kind == "int":
                out[c] = [np.zeros(n, np.int64), np.zeros(n, np.uint8), {}]
            elif kind == "len":
                out[c] = np.zeros(n, np.int64)
            else:
                out[c] = np.full(n, None, dtype=object)
        for source_id, rows in sel.assign(out_start=out_start).groupby("source", sort=False):
            rows = rows.sort_values("start")
            s = self._sources[source_id]
            starts, cnts = rows["start"].to_numpy(np.int64), rows["count"].to_numpy(np.int64)
            runs = _runs(starts, cnts)
            src = _rows_of(starts, cnts)  # the source's selected rows, ascending
            dest = np.repeat(rows["out_start"].to_numpy() - starts, cnts) + src  # where they go
            with s.open() as h5:
                for c, kind in kinds.items():
                    base = c[4:-1] if kind == "len" else c
                    if base not in s.columns:  # e.g. a reward column another attempt did not have
                        continue
                    g = h5[f"samples/{base}"]
                    if kind == "float":
                        out[c][dest] = _take(g["value"], runs)
                    elif kind == "len":
                        out[c][dest] = _take(g["len"], runs)
                    elif kind == "int":
                        out[c][0][dest] = _take(g["value"], runs)
                        out[c][1][dest] = _take(g["state"], runs)
                        if "big_row" in g:
                            where = dict(zip(src.tolist(), dest.tolist()))
                            for r, v in zip(g["big_row"][()].tolist(), _strings(g["big_value"])):
                                if r in where:
                                    out[c][2][where[r]] = int(v)
                    elif kind == "ids":
                        lens = g["len"][()]
                        first = np.r_[0, np.cumsum(lens)].astype(np.int64)
                        vals = _take(g["value"], _runs(first[starts], first[starts + cnts] - first[starts]))
                        pieces = np.split(vals, np.cumsum(lens[src])[:-1]) if len(src) else []
                        for d, p in zip(dest.tolist(), pieces):  # one by one: numpy would broadcast lists
                            out[c][d] = p.tolist()
                    else:
                        out[c][dest] = _read_text(g, rows["j"].to_numpy(), cnts, _take(g["len"], runs))
        return out, kinds


def _int_column(value: np.ndarray, state: np.ndarray, big: dict[int, int]) -> Any:
    if big:  # beyond int64: Python ints in an object column
        out = value.astype(object)
        out[state == _STATE_NONE] = None
        for i, v in big.items():
            out[i] = v
        return out
    return pd.arrays.IntegerArray(value, state == _STATE_NONE)


def _to_frame(out: dict[str, Any], kinds: dict[str, str]) -> pd.DataFrame:
    data = {c: out[c] for c in META_COLUMNS}
    for c, kind in kinds.items():
        data[c] = _int_column(*out[c]) if kind == "int" else out[c]
    df = pd.DataFrame(data)
    return df.astype({"step": np.int64, "rank": np.int64, "time": np.float64, "attempt_seq": np.int64})


def _records(out: dict[str, Any], kinds: dict[str, str]) -> Iterator[dict]:
    cols: dict[str, list] = {c: out[c].tolist() for c in META_COLUMNS}
    for c, kind in kinds.items():
        if kind == "int":
            value, state, big = out[c]
            col = [None if s == _STATE_NONE else v for v, s in zip(value.tolist(), state.tolist())]
            for i, v in big.items():
                col[i] = v
            cols[c] = col
        else:
            cols[c] = out[c].tolist()
    names = list(cols)
    for row in zip(*cols.values()):
        yield dict(zip(names, row))


def _trace_dir(path: Path) -> Path:
    """A trace directory from a trace or run directory (``<run>/traces`` or config.yaml's traces dir)."""
    if (path / "pending").is_dir() or (path / ".staging").is_dir() or any(path.glob("*.h5")):
        return path
    config = path / "config.yaml"
    if config.is_file():
        import yaml

        cfg = yaml.safe_load(config.read_text()) or {}
        candidates = []
        if (cfg.get("traces") or {}).get("dir"):
            candidates.append(Path(cfg["traces"]["dir"]))
        if os.environ.get("SCRATCH") and cfg.get("name"):
            candidates.append(Path(os.environ["SCRATCH"]) / "rlarith" / cfg["name"] / "traces")
        candidates.append(path / "traces")
        for c in candidates:
            if c.is_dir():
                return c
    if (path / "traces").is_dir():
        return path / "traces"
    if path.is_dir() and path.name == "traces":
        return path
    raise TraceError(f"no traces in {path}: expected a trace directory or a run directory with traces/")


def open(path: str | Path) -> Traces:  # noqa: A001  (the module's reader, used as ``traces.open``)
    """The traces of a run: ``path`` is a trace directory or a run directory."""
    return Traces(_trace_dir(Path(path)))


# ----------------------------------------------------------------------------------------------------------
# Export and plot (the CLI's ``rlarith traces export|plot``)


def export(tr: Traces, out: str | Path, fmt: str, all_attempts: bool = False) -> Path:
    """Write the view as Parquet (one table) or JSONL (one record per line, as ``json.dumps`` writes it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with builtins.open(out, "w") as fh:
            for r in tr.records(all_attempts=all_attempts):
                fh.write(json.dumps(r) + "\n")
    elif fmt == "parquet":
        df = tr.frame(all_attempts=all_attempts)
        for c in df.columns:  # ints beyond int64 cannot be Parquet integers: keep them exactly, as text
            if df[c].dtype == object and tr.columns.get(c) == "int":
                df[c] = [None if v is None else str(v) for v in df[c]]
        df.to_parquet(out, index=False)
    else:
        raise TraceError(f"unknown export format {fmt!r}; use parquet or jsonl")
    return out


def plot(tr: Traces, out: str | Path) -> Path:
    """A PNG of reward components, accuracy, extraction failures and completion length over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = tr.by_step()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax = axes[0, 0]
    for c in [c for c in s.columns if c.startswith("reward")]:
        ax.plot(s["step"], s[c], label=c)
    ax.set_title("reward components (mean)")
    ax.legend(fontsize=8)
    for ax, c, title in (
        (axes[0, 1], "accuracy", "accuracy (mean of reward/exact)"),
        (axes[1, 0], "extraction_failure", "extraction failure rate (parsed is None)"),
        (axes[1, 1], "completion_len", "completion length (tokens, mean)"),
    ):
        if c in s:
            ax.plot(s["step"], s[c])
        ax.set_title(title)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"traces: {tr.directory}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_summary(s: dict, rows: int = 40) -> str:
    """The summary as text; at most ``rows`` evenly spaced steps of the per-step table (0: all)."""
    lines = [
        f"traces: {s['directory']}",
        f"steps: {s['steps']:,}  samples: {s['samples']:,} (all attempts: {s['samples_all_attempts']:,})",
        f"ranks: {', '.join(map(str, s['ranks'])) or '-'}  attempts: {', '.join(s['attempts']) or '-'}",
        f"files: {s['shards']:,} shards, {s['journals']:,} journals  bytes on disk: {s['bytes']:,} "
        f"({s['bytes_per_sample']:.1f} per sample)",
        f"compression: {s['compression_ratio']:.1f}x smaller than JSONL of the same records ({s['jsonl_bytes']:,} bytes)",
    ]
    table = s["by_step"]
    if len(table):
        if rows and len(table) > rows:
            picks = np.unique(np.linspace(0, len(table) - 1, rows).round().astype(int))
            lines.append(f"by step (every ~{len(table) // rows}th of {len(table)}; --rows 0 for all):")
            table = table.iloc[picks]
        else:
            lines.append("by step:")
        lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return "\n".join(lines)
