"""The on-disk format of traces (schema version 1): names, the journal record, the shard's datasets.

A shard is columnar: one dataset per column (``samples/<name>/...``) holding every row of the shard, and
a ``steps`` table (step, time, first row, row count). Numeric columns are plain HDF5 datasets with
shuffle+gzip, which every HDF5 has (no plugin to carry). Text columns are one zstd frame per step,
concatenated in a ``uint8`` dataset with offsets, plus each sample's UTF-8 length; the frames share a
raw-content zstd dictionary made of the writer's first step, which carries the prompt template (-40% on
prompts). Result: ~38x smaller than JSONL of the same records; numbers and the alternatives measured
(a prompt table, trained dictionaries, blocks of steps) are in benchmarks/traces.md. Per-step frames
because a step is the unit of durability and of random access; blocks of ten steps would save ~1.6 B of
~13 B per sample.

A journal record is ``magic, length, crc32, payload`` (little-endian); the payload is a JSON header and
the raw arrays of one ``Block``, the in-memory form shared by journal records and shards.
docs/traces.md is the reference, with a decode recipe needing only h5py+zstd.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zstandard

from rlarith.durable import StorageError

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
RESERVED = ("value", "state", "len", "zstd", "zstd_off", "dict", "big_row", "big_value")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
STATE_NONE, STATE_VALUE, STATE_BIG = 0, 1, 2
DICT_MAX = 16 * 1024  # raw-content dictionary: the first step's distinct texts, up to this many bytes
CHUNK_ROWS = 32768  # shard chunk of a numeric column: 256 KiB of int64, ~500 steps of 64 samples
GZIP_LEVEL = 6  # shuffle+gzip level of numeric columns in shards
LIBVER = "v110"  # HDF5 >= 1.10 (2016): compact chunk indexes, ~3 KB less per dataset than "earliest"
MAGIC = b"RLT1"
RECORD = struct.Struct("<4sII")  # magic, payload length, crc32(payload)


class TraceError(ValueError):
    """A user-facing problem with traces (none found, unknown column, newer schema); the message says which."""


class TraceStorageError(StorageError):
    """Writing traces failed on the storage (disk full, read-only, I/O error, a folder that cannot be made):
    the message is one paragraph saying which file, what happened, what is intact and what to do; ``errno``
    is the error's. ``rlarith`` prints it and exits 74, not 75 (rlarith.durable)."""

    errno: int | None = None


def _safe(attempt: str) -> str:
    """A filename-safe form of an attempt id; a hash suffix keeps two ids that sanitize alike apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", attempt)[:64]
    if safe != attempt or not safe:
        safe += "-" + hashlib.sha1(attempt.encode()).hexdigest()[:8]
    return safe


def file_prefix(rank: int, attempt: str) -> str:
    return f"rank{int(rank):04d}.{_safe(attempt)}"


# ----------------------------------------------------------------------------------------------------------
# A block: the in-memory form of a journal record or of a shard, holding exactly the on-disk datasets.


@dataclass
class Block:
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


def pack(block: Block) -> bytes:
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


def unpack(payload: bytes) -> Block:
    (n,) = struct.unpack_from("<I", payload)
    h = json.loads(payload[4 : 4 + n])
    pos = 4 + n
    block = Block(
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


def read_journal(path: Path) -> list[Block]:
    """The journal's complete records, in order (``read_journal_checked`` also says why it stopped)."""
    return read_journal_checked(path)[0]


def read_journal_checked(path: Path) -> tuple[list[Block], str | None]:
    """The journal's complete records, in order, and None or the damage that ended them. A record cut
    short by the end of the file is the one a kill interrupted: normal, nothing after it was written; so
    is a tail of zero bytes, what a crashed filesystem leaves where the file's size was made durable and
    its last data was not. A record with the wrong magic or CRC is damage: the bytes from there on cannot
    be trusted."""
    data = path.read_bytes()
    blocks, pos = [], 0
    while pos + RECORD.size <= len(data):
        magic, n, crc = RECORD.unpack_from(data, pos)
        payload = data[pos + RECORD.size : pos + RECORD.size + n]
        if magic == MAGIC and len(payload) < n:
            break  # torn by a kill
        if magic != MAGIC or zlib.crc32(payload) != crc:
            # Zeros from this record's header (or, with a whole header, from inside its payload) to the end
            # of the file were never written: a crash made the file's size durable and not its last data.
            unwritten = len(data.rstrip(b"\0")) <= (pos if magic != MAGIC else pos + RECORD.size + n - 1)
            if unwritten:
                break
            what = "magic" if magic != MAGIC else "CRC-32"
            return (
                blocks,
                f"record at byte {pos} fails its {what} check; {len(data) - pos:,} bytes from there unread",
            )
        try:
            blocks.append(unpack(payload))
        except (ValueError, KeyError, TypeError) as err:  # a CRC collision or a writer bug: still damage
            return blocks, f"record at byte {pos} does not decode ({err})"
        pos += RECORD.size + n
    return blocks, None


def kind_of(name: str, values: list) -> str:
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


def encode_int(name: str, values: list) -> dict[str, np.ndarray]:
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
        if INT64_MIN <= v <= INT64_MAX:
            value[i], state[i] = v, STATE_VALUE
        else:  # e.g. a 30-digit parsed answer: kept exactly, as decimal text on the side
            state[i] = STATE_BIG
            big_row.append(i)
            big_value.append(str(v))
    out = {"value": value, "state": state}
    if big_row:
        out["big_row"] = np.asarray(big_row, np.int64)
        out["big_value"] = np.asarray(big_value, dtype=object)
    return out


class TextCodec:
    """zstd with an optional raw-content dictionary."""

    def __init__(self, level: int, dict_bytes: bytes) -> None:
        self.dict_bytes = dict_bytes
        d = None
        if dict_bytes:
            d = zstandard.ZstdCompressionDict(dict_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        self.cctx = zstandard.ZstdCompressor(
            level=level,
            dict_data=d,
            write_dict_id=False,
            write_checksum=True,  # damage shows on read
        )
        self.dctx = zstandard.ZstdDecompressor(dict_data=d)

    @staticmethod
    def make_dict(encoded: list[bytes]) -> bytes:
        out = b"".join(dict.fromkeys(encoded))[:DICT_MAX]  # distinct texts: 8 prompts hold the template
        return out if len(out) >= 8 else b""


def text_datasets(frames: list[bytes], lens: list[np.ndarray], dict_bytes: bytes) -> dict[str, np.ndarray]:
    off = np.zeros(len(frames) + 1, np.int64)
    off[1:] = np.cumsum([len(f) for f in frames])
    return {
        "len": np.concatenate(lens) if lens else np.zeros(0, np.int64),
        "zstd": np.frombuffer(b"".join(frames), np.uint8),
        "zstd_off": off,
        "dict": np.frombuffer(dict_bytes, np.uint8),
    }


def merge(blocks: list[Block], level: int) -> Block:
    """One block holding the steps, rows and metrics of ``blocks`` in order (all of one rank and attempt)."""
    attrs = dict(blocks[0].attrs)
    attrs["seq_first"] = min(int(b.attrs["seq_first"]) for b in blocks)
    attrs["seq_last"] = max(int(b.attrs["seq_last"]) for b in blocks)
    out = Block(
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
            codec = TextCodec(level, target)
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
                    dctx = TextCodec(level, p["dict"].tobytes()).dctx
                    fs = [codec.cctx.compress(dctx.decompress(f)) for f in fs]
                frames += fs
                lens.append(p["len"])
            out.columns[name] = (kind, text_datasets(frames, lens, target))
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


def write_shard(h5: h5py.File, block: Block) -> None:
    """Every dataset of ``block`` into an empty file: numbers chunked with shuffle+gzip, zstd blobs chunked."""

    def put(where: str, arr: np.ndarray) -> None:
        if arr.dtype == object:  # big ints as decimal strings
            h5.create_dataset(where, data=arr.astype(str).astype(object), dtype=h5py.string_dtype())
        elif arr.size == 0 or where.endswith(("/dict", "/zstd")):
            # zstd frames are compressed already; contiguous storage holds exactly their bytes (a chunked
            # dataset would pad its last chunk) and still reads just the byte range asked for.
            h5.create_dataset(where, data=arr)
        else:
            chunks = (min(len(arr), CHUNK_ROWS),) + arr.shape[1:]
            h5.create_dataset(
                where, data=arr, chunks=chunks, shuffle=True, compression="gzip", compression_opts=GZIP_LEVEL
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
        resume_step=np.int64(a.get("resume_step", -1)),
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


def check_version(h5: h5py.File, path: Path) -> None:
    if int(h5.attrs["version"]) > VERSION:
        version = int(h5.attrs["version"])
        raise TraceError(f"{path} has trace schema {version}; this rlarith reads up to {VERSION}: upgrade it")


def is_covered(seq: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= seq <= hi for lo, hi in ranges)
