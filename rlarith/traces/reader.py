"""The trace reader: ``open(path)`` gives a ``Traces`` with pandas views of every shard and journal.

Attempts. Each writer records its ``attempt`` id and ``attempt_seq`` (chronological). The default view
shows each step once, from the latest attempt (by ``attempt_seq``) that recorded it: after a resume that
is the attempt the final model descends from. ``all_attempts=True`` shows every copy.

Reading never decompresses what was not asked for: the index (``steps`` and attributes) comes first, then
only the requested columns' datasets, and only the row ranges and zstd frames of the selected steps.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import zstandard

from rlarith import metrics as metrics_file
from rlarith.config import ConfigDamaged, ConfigError, RunConfig, default_trace_dir
from rlarith.traces.format import (
    FORMAT,
    META_COLUMNS,
    STATE_NONE,
    Block,
    TextCodec,
    TraceError,
    check_version,
    is_covered,
    merge,
    read_journal_checked,
)
from rlarith.traces.owner import read_owner


@dataclass
class Source:
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
    resume_step: int = -1  # recorded by the writer; -1: not recorded
    block: Block | None = None  # journals only

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

    def __init__(self, block: Block) -> None:
        self.block = block

    def __getitem__(self, path: str) -> dict[str, np.ndarray]:
        return self.block.columns[path.split("/", 1)[1]][1]

    def __enter__(self) -> _BlockView:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_INDEX_COLUMNS = ["step", "time", "start", "count", "j", "source", "rank", "attempt", "attempt_seq", "run_id"]


def _scan(directory: Path) -> tuple[list[Source], pd.DataFrame, list[tuple[Path, str]]]:
    """Every shard and journal, minus journal records a shard already covers, the table of their steps
    (one row per step and source: where its rows are, and whose they are), in commit order, and the files
    skipped as damaged, with the reason."""
    skipped: list[tuple[Path, str]] = []
    for path in sorted(directory.glob("pending/*.damaged")):
        skipped.append((path, "a damaged journal a later writer set aside; delete it to accept the loss"))
    # Journals before shards: a journal sealed meanwhile was either read here (and its shard, listed
    # after, covers it) or already deleted (and then its shard was renamed in before we list shards).
    journals = []
    for path in sorted(directory.glob("pending/*.journal")):
        try:
            blocks, damage = read_journal_checked(path)
            journals.append((path, blocks, path.stat().st_size))
        except FileNotFoundError:
            continue
        if damage:
            skipped.append((path, f"damaged journal: {damage}"))
    sources: list[Source] = []
    tables = []
    for path in sorted(directory.glob("*.h5")):
        try:
            with h5py.File(path, "r", locking=False) as h5:
                if h5.attrs.get("format") != FORMAT:
                    skipped.append((path, "not a trace file (no format attribute)"))
                    continue
                check_version(h5, path)
                a = h5.attrs
                src = Source(
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
                    resume_step=int(a.get("resume_step", -1)),
                )
                tables.append({k: h5[f"steps/{k}"][()] for k in ("step", "time", "start", "count")})
        except FileNotFoundError:
            continue
        except DAMAGE as err:  # shards appear complete or not at all: this is damage, not a kill
            skipped.append((path, _reason(err)))
            continue
        sources.append(src)
    covered: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for s in sources:
        covered.setdefault((s.rank, s.attempt), []).append((s.seq_first, s.seq_last))
    for path, blocks, size in journals:
        if blocks:
            a = blocks[0].attrs
            ranges = covered.get((int(a["rank"]), a["attempt"]), [])
            blocks = [b for b in blocks if not is_covered(int(b.attrs["seq_first"]), ranges)]
        if not blocks:
            continue
        block = merge(blocks, 1)
        a = block.attrs
        src = Source(
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
            resume_step=int(a.get("resume_step", -1)),
            block=block,
        )
        sources.append(src)
        start = np.r_[0, np.cumsum(block.count)[:-1]].astype(np.int64) if len(block.count) else block.count
        tables.append({"step": block.step, "time": block.time, "start": start, "count": block.count})
    for path, reason in skipped:
        warnings.warn(f"traces: skipping {path}: {reason}", stacklevel=3)
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
    return sources, index.astype(dict(types, rank=np.int64, attempt_seq=np.int64)), skipped


# What reading a damaged file raises: HDF5 (truncated file, bad chunk: OSError, KeyError for a lost
# object), zstd (a frame failing its checksum), text that is not UTF-8 any more.
DAMAGE = (OSError, KeyError, zstandard.ZstdError, UnicodeDecodeError)


def _reason(err: BaseException) -> str:
    return f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


class _Damaged(Exception):
    """Reading one source failed; the reader skips it and reads again."""

    def __init__(self, source: int, reason: str) -> None:
        super().__init__(reason)
        self.source, self.reason = source, reason


def resume_points(sources: list[Source], index: pd.DataFrame) -> dict[str, int]:
    """Per attempt, the step it resumed from: as recorded by its writer, else the step before its first
    recorded one. Steps of earlier attempts after it are superseded (the final model descends from
    neither)."""
    first = index.groupby("attempt")["step"].min().to_dict() if len(index) else {}
    out: dict[str, int] = {}
    for s in sources:
        recorded = s.resume_step if s.resume_step >= 0 else None
        inferred = int(first[s.attempt]) - 1 if s.attempt in first else None
        value = recorded if recorded is not None else inferred
        if value is not None:
            out[s.attempt] = min(out.get(s.attempt, value), value)
    return out


def _latest(
    df: pd.DataFrame, order: str, resume: dict[str, int], among: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The default view: each step's rows from the latest attempt (by attempt_seq, then id) that recorded
    it, on every rank, after dropping superseded rows: those of an attempt at a step past the resume
    point of a later attempt among ``among``'s (default: ``df``'s)."""
    if df.empty:
        return df
    among = df if among is None else among
    attempts = among[["attempt_seq", "attempt"]].drop_duplicates().sort_values(["attempt_seq", "attempt"])
    cut, later = {}, np.inf  # per attempt: the lowest resume point of any later attempt
    for a in reversed(attempts["attempt"].tolist()):
        cut[a] = later
        later = min(later, resume.get(a, np.inf))
    kept = df[df["step"].to_numpy() <= df["attempt"].map(cut).to_numpy(np.float64)]
    ordered = kept.sort_values(["step", "attempt_seq", "attempt", order], kind="stable")
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
    dctx = TextCodec(1, g["dict"][()].tobytes()).dctx
    off = g["zstd_off"][()]
    per_step = iter(np.split(lens, np.cumsum(counts)[:-1]) if len(counts) else [])
    texts: list[str] = []
    for lo, hi in _runs(js, np.ones(len(js), np.int64)):
        span = g["zstd"][off[lo] : off[hi]].tobytes()
        for j in range(lo, hi):
            raw = dctx.decompress(span[off[j] - off[lo] : off[j + 1] - off[lo]])
            ends = np.cumsum(next(per_step)).tolist()
            if len(raw) != (ends[-1] if ends else 0):  # frames written before checksums were on
                raise OSError(
                    f"text frame {j} holds {len(raw)} bytes; the lengths say {ends[-1] if ends else 0}"
                )
            texts += [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip([0] + ends[:-1], ends)]
    return texts


def _strings(ds: Any) -> list[str]:
    return list(ds.asstr()[()]) if isinstance(ds, h5py.Dataset) else list(ds)


class Traces:
    """The traces in one directory. The index is read when the object is made: ``open()`` again to see
    steps written since. Views: by default each step once, from the latest attempt that recorded it.

    Damaged files (a truncated shard, a chunk or frame that fails its checksum, a journal record with a
    bad CRC) are skipped with a warning naming the file and the reason, whether found when the index is
    read or when rows are; ``skipped`` lists them and ``verify()`` reads everything to find them all."""

    def __init__(
        self, directory: str | Path, run_dir: str | Path | None = None, generate_every: int = 1
    ) -> None:
        """``run_dir``: the run the traces belong to, whose metrics.jsonl says which steps should be there
        (``missing``); ``generate_every``: its steps per generation batch (steps_per_generation x
        num_iterations: traces record the first step of each batch)."""
        self.directory = Path(directory)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.generate_every = generate_every
        self._load()

    def _load(self) -> None:
        self._sources, self._index, self._skipped = _scan(self.directory)
        self._resume = resume_points(self._sources, self._index)
        self._dropped: set[int] = set()

    # -- public ---------------------------------------------------------------------------------------------

    @property
    def sources(self) -> list[Source]:
        """The shards and journals read, in commit order (without any found damaged)."""
        return [s for i, s in enumerate(self._sources) if i not in self._dropped]

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """The files skipped as damaged so far, and why."""
        return list(self._skipped)

    def resumes(self) -> dict[str, int]:
        """Per attempt after the first, the step it resumed from (see ``resume_points``)."""
        return dict(list(self._resume.items())[1:]) if self._resume else {}

    def verify(self) -> list[tuple[Path, str]]:
        """Read every dataset of every shard and decompress every text frame, skipping (as reading
        would) every file that fails; returns ``skipped``."""
        for i, s in enumerate(self._sources):
            if i in self._dropped or not s.sealed:  # journals were CRC-checked when read
                continue
            try:
                _verify_shard(s.path)
            except FileNotFoundError:
                continue
            except DAMAGE as err:
                self._drop(i, _reason(err))
        return self.skipped

    def steps(self, all_attempts: bool = False) -> pd.DataFrame:
        """The index: one row per step and file (step, time, count, rank, attempt, attempt_seq, ...), of
        the default view or of every attempt. Reads no samples."""
        return self._select(None, None, None, all_attempts)

    @property
    def columns(self) -> dict[str, str]:
        """Sample columns and their kinds (``text``, ``ids``, ``int``, ``float``) across all files."""
        out: dict[str, str] = {}
        for s in self.sources:
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
            yield from _records(*self._read_safe(sel.iloc[lo : lo + 256], names))

    def metrics(self, all_attempts: bool = False) -> pd.DataFrame:
        """Logged metrics: one row per (step, rank, attempt), or, by default, per (step, rank) from the
        latest attempt that logged that step. Metrics sent twice for a step merge, later values winning."""
        meta = ["step", "rank", "attempt", "attempt_seq", "run_id", "time"]
        parts = []
        for i, s in enumerate(self._sources):
            if i in self._dropped:
                continue
            try:
                names, step, t, values = s.metrics()
            except FileNotFoundError:  # sealed since the index was read: read again
                self._load()
                return self.metrics(all_attempts)
            except DAMAGE as err:
                self._drop(i, _reason(err))
                continue
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
            df = _latest(df, "source", self._resume, among=self._index)  # attempts with samples too
        df = df.sort_values(["step", "rank", "attempt_seq", "attempt"], kind="stable")
        return df[meta + names].reset_index(drop=True)

    def seen_keys(self) -> set[str]:
        """Every problem key in the traces, every attempt and rank (for evaluation's contamination check)."""
        if "key" not in self.columns:
            return set()
        out, _ = self._read_fresh((None, None, None, True), ["key"])
        return {k for k in out["key"] if k is not None}

    def missing(self) -> list[tuple[int, int]]:
        """Steps the run's metrics.jsonl has and these traces lack (purged, lost in a crash, or never
        written), as ranges ``(first, last)``; [] without a run directory. A step counts as traced when the
        traces hold the step that began its generation batch."""
        if self.run_dir is None:
            return []
        return missing_steps(self.run_dir, set(self._index["step"].tolist()), self.generate_every)

    def summary(self) -> dict:
        """Steps, samples, files, bytes on disk, resumes, damaged files skipped, steps missing, and reward
        and accuracy by step (``rlarith traces summary``). Every file is read in full first (``verify``),
        so damage anywhere shows in ``skipped``. The compression ratio against JSON lines is a
        measurement, not a summary: benchmarks/traces_bench.py."""
        self.verify()
        default = self.steps()
        every = self.steps(all_attempts=True)
        size = sum(s.size for s in self.sources)
        return {
            "directory": str(self.directory),
            "run_dir": None if self.run_dir is None else str(self.run_dir),
            "owner": read_owner(self.directory),  # run.json: the run directory the folder belongs to
            "steps": int(default["step"].nunique()),
            "samples": int(default["count"].sum()),
            "samples_all_attempts": int(every["count"].sum()),
            "ranks": sorted({s.rank for s in self.sources}),
            "attempts": list(dict.fromkeys(s.attempt for s in self.sources)),  # chronological
            "run_ids": list(dict.fromkeys(s.run_id for s in self.sources)),
            "resumes": self.resumes(),
            "shards": sum(s.sealed for s in self.sources),
            "journals": sum(not s.sealed for s in self.sources),
            "bytes": size,
            "bytes_per_sample": size / max(int(every["count"].sum()), 1),
            "skipped": [(str(path), reason) for path, reason in self.skipped],
            "missing": self.missing(),
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
            df = _latest(df, "source", self._resume)
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
        index is read again, once; a file found damaged is skipped and the selection made again."""
        reloaded = False
        while True:
            try:
                return self._read(self._select(*select), names)
            except FileNotFoundError:
                if reloaded:
                    raise
                self._load()
                reloaded = True
            except _Damaged as d:
                self._drop(d.source, d.reason)

    def _read_safe(self, sel: pd.DataFrame, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """``_read`` of fixed rows, without those of files found damaged."""
        while True:
            try:
                return self._read(sel[~sel["source"].isin(self._dropped)], names)
            except _Damaged as d:
                self._drop(d.source, d.reason)

    def _drop(self, source: int, reason: str) -> None:
        path = self._sources[source].path
        warnings.warn(f"traces: skipping {path}: {reason}", stacklevel=4)
        self._skipped.append((path, reason))
        self._dropped.add(source)
        self._index = self._index[self._index["source"] != source]

    def _read(self, sel: pd.DataFrame, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """The selected step blocks' rows, in order, as raw columns: arrays (float, len), object arrays
        (text, ids), [values, states, {row: big int}] (int). Only ``names`` are read."""
        counts = sel["count"].to_numpy(np.int64)
        n = int(counts.sum())
        out_start = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64) if len(counts) else counts
        known = {c: k for s in self._sources for c, k in s.columns.items()}  # damaged files' too
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
            try:
                self._read_source(s, out, kinds, rows, runs, src, dest)
            except FileNotFoundError:
                raise
            except DAMAGE as err:
                raise _Damaged(source_id, _reason(err)) from err
        return out, kinds

    @staticmethod
    def _read_source(
        s: Source, out: dict, kinds: dict, rows: pd.DataFrame, runs: list, src: Any, dest: Any
    ) -> None:
        """One file's share of ``_read``."""
        starts, cnts = rows["start"].to_numpy(np.int64), rows["count"].to_numpy(np.int64)
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


def _read_dataset(_: str, obj: Any) -> None:
    if isinstance(obj, h5py.Dataset):
        obj[()]  # returns None: visititems stops at the first callback that returns something


def _verify_shard(path: Path) -> None:
    """Read every dataset of a shard and decompress every text frame (checksums, lengths)."""
    with h5py.File(path, "r", locking=False) as h5:
        h5.visititems(_read_dataset)
        counts = h5["steps/count"][()]
        for name, kind in json.loads(h5.attrs["columns"]).items():
            if kind == "text":
                g = h5[f"samples/{name}"]
                _read_text(g, np.arange(len(counts)), counts, g["len"][()])


def _int_column(value: np.ndarray, state: np.ndarray, big: dict[int, int]) -> Any:
    if big:  # beyond int64: Python ints in an object column
        out = value.astype(object)
        out[state == STATE_NONE] = None
        for i, v in big.items():
            out[i] = v
        return out
    return pd.arrays.IntegerArray(value, state == STATE_NONE)


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
            col = [None if s == STATE_NONE else v for v, s in zip(value.tolist(), state.tolist())]
            for i, v in big.items():
                col[i] = v
            cols[c] = col
        else:
            cols[c] = out[c].tolist()
    names = list(cols)
    for row in zip(*cols.values()):
        yield dict(zip(names, row))


def ranges(steps: list[int], every: int = 1) -> list[tuple[int, int]]:
    """Ascending steps as ``(first, last)`` ranges; steps ``every`` apart (one per generation batch) join,
    the last reaching to the end of its batch.

    >>> ranges([1, 2, 3, 7, 9])
    [(1, 3), (7, 7), (9, 9)]
    """
    out: list[tuple[int, int]] = []
    for step in steps:
        if out and step - out[-1][1] <= every:
            out[-1] = (out[-1][0], step)
        else:
            out.append((step, step))
    return out


def missing_steps(run_dir: Path, traced: set[int], every: int = 1) -> list[tuple[int, int]]:
    """The training steps ``run_dir``'s metrics.jsonl logged whose generation batch (``every`` steps, the
    first one traced) is not among ``traced``, as ranges."""
    logged = {r["step"] for r in metrics_file.read(run_dir) if "loss" in r and isinstance(r.get("step"), int)}
    every = max(1, every)
    return ranges(sorted(s for s in logged if s - (s - 1) % every not in traced), every)


def trace_gaps(directory: Path, run_dir: Path, every: int = 1) -> str | None:
    """``missing_text`` for the steps ``run_dir``'s metrics.jsonl has and the traces in ``directory`` lack,
    or None: what the trainer says at a resume."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damaged files are the reader's to report
        spans = Traces(directory, run_dir, every).missing()
    return missing_text(spans, Path(directory), Path(run_dir)) if spans else None


def format_ranges(spans: list[tuple[int, int]]) -> str:
    """``1-20, 31, 40-41``."""
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def missing_text(spans: list[tuple[int, int]], directory: Path, run_dir: Path | None) -> str:
    """The sentence every reader of a run's traces says when steps are missing."""
    where = f" ({str(run_dir / metrics_file.METRICS)!r} has them)" if run_dir is not None else ""
    return (
        f"traces for steps {format_ranges(spans)} are missing from {str(directory)!r}: purged or lost{where}; "
        "restore them from a copy if there is one (`rsync -a --delete COPY/ TRACE_DIR/`)"
    )


def run_trace_dir(run_dir: Path, cfg: RunConfig) -> Path:
    """Where a run's traces are: ``traces.dir``, else the default for this very run directory
    (rlarith.config.default_trace_dir: ``<run dir>/traces``, or a folder on $SCRATCH named for it)."""
    return Path(cfg.traces.dir) if cfg.traces.dir else default_trace_dir(Path(run_dir), cfg.name)


def _run_config(run_dir: Path) -> RunConfig | None:
    """The run's config (None when it has no config.yaml or it does not parse as one); a config.yaml a crash
    emptied is never the defaults, whose trace folder would be another run's: the checkpoint's copy stands in."""
    from rlarith.checkpoints import run_config

    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        cfg, note = run_config(run_dir)
    except ConfigDamaged as err:
        raise TraceError(f"cannot tell where the run's traces are: {err}") from None
    except ConfigError:
        return None
    if note:
        warnings.warn(note, stacklevel=2)
    return cfg


def _generate_every(cfg: RunConfig | None) -> int:
    return 1 if cfg is None else cfg.training.steps_per_generation * cfg.training.num_iterations


def _locate(path: Path) -> tuple[Path, Path | None, RunConfig | None]:
    """The trace directory from a trace or run directory (its config's trace folder, else
    ``<run>/traces``), the run directory it belongs to (None when unknown) and that run's config."""
    if (path / "pending").is_dir() or (path / ".staging").is_dir() or any(path.glob("*.h5")):
        recorded = Path(str(read_owner(path).get("run_dir", "")))
        if recorded.name and (recorded / "config.yaml").is_file():
            return path, recorded, _run_config(recorded)
        return path, None, None
    cfg = _run_config(path)
    if cfg is not None:
        configured = run_trace_dir(path, cfg)
        if configured.is_dir():
            return configured, path, cfg
        if (path / "traces").is_dir():  # a moved run keeps its traces beside it
            return path / "traces", path, cfg
        lacking = missing_steps(path, set(), _generate_every(cfg))
        raise TraceError(
            f"no traces for the run {str(path)!r}: its trace folder {str(configured)!r} (traces.dir, or the "
            f"default for this run directory) does not exist"
            + (f"; {missing_text(lacking, configured, path)}" if lacking else "")
            + "."
        )
    if (path / "traces").is_dir():
        return path / "traces", path, None
    if path.is_dir() and path.name == "traces":
        return path, None, None
    raise TraceError(f"no traces in {path}: expected a trace directory or a run directory with traces/")


def open(path: str | Path) -> Traces:  # noqa: A001  (the module's reader, used as ``traces.open``)
    """The traces of a run: ``path`` is a trace directory or a run directory. A run directory's traces
    know which steps its metrics.jsonl says they should hold (``Traces.missing``)."""
    directory, run_dir, cfg = _locate(Path(path))
    return Traces(directory, run_dir, _generate_every(cfg))
