"""The trace writer: one per rank and attempt, crash-safe, append-only between shards.

Crash safety. HDF5 is not journaled and a file killed mid-write can be unreadable, so no HDF5 file is
written in place: a shard is written under ``.staging/``, fsynced, renamed into place (atomic), and the
directory fsynced. Between shards, each ``write_step`` / ``write_metrics`` appends one record to the
writer's journal in a single ``write``. A kill can only tear the last record, which then fails its
length or checksum and is ignored with everything after it; every complete record is already in the
page cache and survives the process. So a SIGKILL at any moment loses at most the step in flight, and
every ``.h5`` file under its final name is complete. Every ``shard_steps`` steps (or ``shard_bytes``) and
at ``close()`` the journal's records become a shard, and only then is the journal deleted; readers skip
journal records whose sequence numbers a shard of the same rank and attempt covers, so the moment between
the two is safe too. A new writer of a rank seals what earlier attempts of that rank left in their
journals (one writer per rank at a time, which a requeued SLURM job guarantees). Per step this costs one
append of ~9 KB instead of a new HDF5 file (12x slower).

A crashed node (or a filesystem that crashes) keeps only what was fsynced: shards always are; the journal
is fsynced by ``sync()``, which the trainer calls at every checkpoint save before the checkpoint is sealed,
so a resume never starts past steps a crash could take back; ``traces.fsync_steps`` fsyncs every record.

Hostile storage. HDF5 never writes to the trace folder itself: a shard is built in memory (HDF5's core
driver) and its bytes written by plain ``os.write``, because HDF5 2.0 failing to write a file (disk full)
leaves ids that crash the interpreter when closed (exit 139). Every storage error (ENOSPC, EROFS, EIO, a
folder that cannot be made) is raised as one ``TraceStorageError`` paragraph: which file, what happened,
what is intact, what to do; after one, ``close()`` does nothing more. A folder removed under a running
writer (a scratch purge) is recreated, with the steps since the last shard, which the writer holds in
memory; it says so once.

A stop signal only sets a flag (rlarith.preemption); the trainer closes the writer from ordinary code
after the step, so nothing here is re-entrant and nothing needs to be.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np

from rlarith import durable
from rlarith.config import TraceConfig
from rlarith.durable import fsync_path
from rlarith.traces import owner
from rlarith.traces.format import (
    LIBVER,
    MAGIC,
    META_COLUMNS,
    RECORD,
    RESERVED,
    Block,
    TextCodec,
    TraceStorageError,
    encode_int,
    file_prefix,
    is_covered,
    kind_of,
    merge,
    pack,
    read_journal_checked,
    text_datasets,
    write_shard,
)

log = logging.getLogger("rlarith")
T = TypeVar("T")


class TraceWriter:
    """Writes the traces of one rank of one attempt; one per process, used from one thread."""

    def __init__(
        self,
        directory: str | Path,
        *,
        run_id: str,
        rank: int,
        attempt: str,
        attempt_seq: int,
        cfg: TraceConfig,
        resume_step: int | None = None,
        run_dir: str | Path | None = None,
    ) -> None:
        """``resume_step``: the step of the checkpoint this attempt resumed from (0 for a fresh start);
        earlier attempts' steps after it are superseded in the default view. None: readers take the
        step before this attempt's first recorded step. ``run_dir``: the run directory the traces belong
        to; the folder is then locked and checked to belong to it (rlarith.traces.owner)."""
        self.directory = Path(directory)
        self.cfg = cfg
        # Records survive a killed process without fsync (the page cache outlives it); fsync_steps makes
        # each step survive a crashed node too, for one fsync per step. Shards are always fsynced.
        self.fsync_steps = cfg.fsync_steps
        self.prefix = file_prefix(rank, attempt)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._attrs = {
            "run_id": run_id,
            "rank": rank,
            "attempt": attempt,
            "attempt_seq": attempt_seq,
            "zstd_level": cfg.zstd_level,
            "resume_step": -1 if resume_step is None else int(resume_step),
        }
        self._closed = False
        self._failed: TraceStorageError | None = None
        self._pending: list[Block] = []
        self._records: list[bytes] = []  # the journal records of _pending, to write again after a purge
        self._synced = 0  # how many of _pending the journal holds fsynced
        self._pending_steps = self._pending_bytes = 0
        self._journals: list[Path] = []
        self._fd: int | None = None
        self._last_step: int | None = None
        self._warned = self._said_purged = self._dirs_synced = False
        self._kinds: dict[str, str] = {}
        self._codecs: dict[str, TextCodec] = {}
        self._seq = 0
        self._lock: owner.TraceLock | None = None
        if cfg.enabled:
            self._guard("Creating the trace folder", self.directory / "pending", self._make_dirs)
            if self.run_dir is not None:
                run_dir = self.run_dir
                self._lock = self._guard(
                    "Locking the trace folder",
                    self.directory,
                    lambda: owner.claim(self.directory, run_id, run_dir, rank),
                )
            try:
                self._guard(
                    "Recovering the trace journals of earlier attempts", self.directory, self._recover
                )
            except BaseException:
                self._release()
                raise

    # -- the trainer's calls --------------------------------------------------------------------------------

    def write_step(
        self, step: int, samples: dict[str, list], metrics: dict[str, float] | None = None
    ) -> None:
        """Record one generation batch (columns of equal length) as ``step``; durable when this returns."""
        if not self._open():
            return
        if self._last_step is not None and step < self._last_step and not self._warned:
            # Recorded anyway: a trace writer never stops training. Two batches of one step both show.
            warnings.warn(
                f"traces: step {step} after step {self._last_step}; steps should not go back", stacklevel=2
            )
            self._warned = True
        block = self._new_block(step, samples)
        if metrics:
            self._add_metrics(block, step, metrics)
        # Roll over before a new step rather than after one, so that the metrics of a shard's last
        # step, which come after its samples, land in the same shard.
        if self._pending_steps >= self.cfg.shard_steps or self._pending_bytes >= self.cfg.shard_bytes:
            self._guard("Sealing a shard of traces", self.directory, self._seal)
        self._commit(block)
        self._last_step = step
        self._pending_steps += 1

    def write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Record logged metrics of ``step``; they may come after (or without) its samples."""
        if not self._open():
            return
        block = self._new_block(None, {})
        self._add_metrics(block, step, metrics)
        if block.m_names:
            self._commit(block)

    def sync(self) -> None:
        """Make every step written so far survive a crashed node: fsync the journal and the folders that
        name it. The trainer calls it at every checkpoint save, before the checkpoint is sealed."""
        if self._closed or not self.cfg.enabled or self._failed is not None:
            return
        self._guard("Fsyncing the trace journal", self.directory / "pending", self._sync)

    def close(self) -> None:
        """Seal what is pending into a shard. Idempotent; the writer takes no writes after it. After a
        storage error it only lets go of the folder (the journal stays for the next start to seal)."""
        if self._closed or not self.cfg.enabled:
            return
        try:
            if self._failed is None:
                self._guard("Sealing a shard of traces", self.directory, self._seal)
        finally:
            self._closed = True
            self._close_fd()
            self._release()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------------

    def _open(self) -> bool:
        """False when disabled (every call is a no-op); an error after ``close()`` or a storage error."""
        if self._closed:
            raise RuntimeError(f"traces: write to {self.directory} after close()")
        if self._failed is not None:
            raise self._failed
        return self.cfg.enabled

    def _guard(self, action: str, path: Path, work: Callable[[], T]) -> T:
        """Run ``work``; an OSError from the storage becomes this writer's ``TraceStorageError``."""
        try:
            return work()
        except TraceStorageError:
            raise
        except OSError as err:
            self._failed = storage_error(action, path, err, self._intact())
            raise self._failed from None

    def _intact(self) -> str:
        """What is safe after a storage error: shards, and the journal's steps up to its last fsync."""

        def span(blocks: list[Block]) -> str:
            steps = [int(s) for b in blocks for s in b.step]
            return f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}" if steps else ""

        synced, unsynced = span(self._pending[: self._synced]), span(self._pending[self._synced :])
        journal = f"pending/{self._journals[-1].name}" if self._journals else "no journal"
        held = f"; {synced}: fsynced (at a checkpoint), safe" if synced else ""
        if unsynced:
            held += (
                f"; {unsynced}: written, not yet fsynced, so a full disk keeps them and a failed "
                "filesystem may have lost them (the next start names any step that is missing)"
            )
        return (
            f"Intact: every sealed shard in {str(self.directory)!r} (shards are never rewritten), and the "
            f"journal ({journal}{held}); the next start seals what the journals hold. Checkpoints and "
            "metrics.jsonl are separate files: nothing here wrote to them."
        )

    def _make_dirs(self) -> None:
        (self.directory / ".staging").mkdir(parents=True, exist_ok=True)
        (self.directory / "pending").mkdir(parents=True, exist_ok=True)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass  # the error, if any, was raised by the write or fsync before
            self._fd = None

    def _purged(self) -> bool:
        """True when the journal or the folder was removed under this writer (a scratch purge): then the
        folder is made again and the steps since the last shard are journaled again from memory."""
        gone = self._fd is not None and os.fstat(self._fd).st_nlink == 0
        if not gone and (self.directory / "pending").is_dir() and (self.directory / ".staging").is_dir():
            return False
        held = [int(s) for b in self._pending for s in b.step]
        folders = [self.directory, self.directory / "pending", self.directory / ".staging"]
        removed = self._journals[-1] if gone else next(p for p in folders if not p.is_dir())
        self._close_fd()
        self._journals = []
        self._make_dirs()
        if self.run_dir is not None and self._attrs["rank"] == 0 and not owner.read_owner(self.directory):
            owner.record(self.directory, str(self._attrs["run_id"]), self.run_dir)
        if not self._said_purged:
            self._said_purged = True
            kept = f"the steps since the last shard ({held[0]}-{held[-1]})" if held else "no steps"
            log.warning(
                "traces: %s was removed while this run wrote to it (a scratch purge?): made it again, with %s "
                "held in memory; steps sealed into shards before the removal are gone if the removal took "
                "them (`rlarith traces summary` names them)",
                removed,
                kept,
            )
        if self._records:
            self._append(b"".join(self._records))
        return True

    def _journal_name(self) -> Path:
        return self.directory / "pending" / f"{self.prefix}.{self._seq - len(self._records):08d}.journal"

    def _append(self, data: bytes) -> None:
        """Append to the journal (opened on first use) in one write; a failed write is cut back off."""
        if self._fd is None:
            path = self._journal_name()
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._journals.append(path)
            if self.fsync_steps:  # the new journal's name must survive a crash too, not only its records
                self._sync_dirs()
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync_steps:
                os.fsync(self._fd)
        except OSError as err:
            err.filename = err.filename or str(self._journals[-1])
            try:  # e.g. disk full: a torn record would hide every later one, so remove it
                os.ftruncate(self._fd, size)
            except OSError:  # cannot: start a new journal, the torn one ends this one
                self._close_fd()
            raise

    def _sync(self) -> None:
        self._purged()
        if self._fd is not None:
            os.fsync(self._fd)
        self._sync_dirs()
        self._synced = len(self._pending)

    def _sync_dirs(self) -> None:
        """fsync the journals' folder (their names), and once the folders above (a new trace folder)."""
        fsync_path(self.directory / "pending")
        if not self._dirs_synced:
            fsync_path(self.directory)
            fsync_path(self.directory.parent)
            self._dirs_synced = True

    def _new_block(self, step: int | None, samples: dict[str, list]) -> Block:
        steps = np.zeros(0, np.int64) if step is None else np.array([step], np.int64)
        attrs = dict(self._attrs, seq_first=self._seq, seq_last=self._seq)
        block = Block(
            attrs=attrs, step=steps, time=np.full(len(steps), time.time()), count=np.zeros(0, np.int64)
        )
        if step is not None:
            block.count = np.array([_n_rows(samples)], np.int64)
            block.columns = self._encode(samples)
        return block

    def _add_metrics(self, block: Block, step: int, metrics: dict[str, float]) -> None:
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
            if name in META_COLUMNS or not name or name.split("/")[-1] in RESERVED or name.startswith("len("):
                raise ValueError(f"traces: {name!r} cannot be a sample column name (reserved)")
            values = values.tolist() if hasattr(values, "tolist") else list(values)
            kind = self._kinds.setdefault(name, kind_of(name, values))
            if kind == "float":
                ds = {"value": np.array([math.nan if v is None else float(v) for v in values], np.float64)}
            elif kind == "int":
                ds = encode_int(name, values)
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
                    self._codecs[name] = TextCodec(self.cfg.zstd_level, TextCodec.make_dict(encoded))
                codec = self._codecs.get(name) or TextCodec(self.cfg.zstd_level, b"")
                lens = np.array([len(e) for e in encoded], np.int64)
                ds = text_datasets([codec.cctx.compress(b"".join(encoded))], [lens], codec.dict_bytes)
            out[name] = (kind, ds)
        return out

    def _commit(self, block: Block) -> None:
        """Append one record to the journal in one write (fsynced with ``fsync_steps``)."""
        payload = pack(block)
        record = RECORD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload

        def commit() -> None:
            self._purged()
            self._append(record)

        self._guard("Appending a step to the trace journal", self.directory / "pending", commit)
        self._seq += 1
        self._pending.append(block)
        self._records.append(record)
        if self.fsync_steps:
            self._synced = len(self._pending)
        self._pending_bytes += block.payload_bytes()

    def _seal(self) -> None:
        if self._pending:
            self._purged()  # the journal's steps must survive a failed seal: journal them again first
            seal_shard(self.directory, self._pending, self.cfg.zstd_level)
        self._close_fd()
        for path in self._journals:
            path.unlink(missing_ok=True)
        self._journals, self._pending, self._records, self._synced = [], [], [], 0
        self._pending_steps = self._pending_bytes = 0

    def _recover(self) -> None:
        """Clear this rank's staging debris; seal what this rank's earlier attempts (or a previous writer
        under this very attempt id) left in journals; number commits after this attempt's last."""
        rank = self.prefix.split(".", 1)[0] + "."
        for tmp in (self.directory / ".staging").glob(rank + "*"):
            tmp.unlink(missing_ok=True)
        mine = (self._attrs["attempt_seq"], self._attrs["attempt"])
        by_prefix: dict[str, list[tuple[Path, list[Block]]]] = {}
        for path in sorted((self.directory / "pending").glob(rank + "*.journal")):
            prefix = path.name.rsplit(".", 2)[0]  # <prefix>.<first commit>.journal
            blocks, damage = read_journal_checked(path)
            by_prefix.setdefault(prefix, []).append((path, blocks))
            if damage:  # keep the evidence: readers report the file until someone deletes it
                warnings.warn(f"traces: {path} is damaged ({damage}); set aside as .damaged", stacklevel=3)
                os.replace(path, path.with_suffix(".damaged"))
        for prefix, journals in by_prefix.items():
            blocks = [b for _, bs in journals for b in bs]
            if blocks and (int(blocks[0].attrs["attempt_seq"]), blocks[0].attrs["attempt"]) > mine:
                continue  # a later attempt's: not ours to touch
            covered = _shard_seqs(self.directory, prefix)
            blocks = [b for b in blocks if not is_covered(int(b.attrs["seq_first"]), covered)]
            if blocks:
                seal_shard(self.directory, blocks, self.cfg.zstd_level)
            for path, _ in journals:
                path.unlink(missing_ok=True)  # a damaged one was renamed
        self._seq = max((last for _, last in _shard_seqs(self.directory, self.prefix)), default=-1) + 1


def _n_rows(samples: dict[str, list]) -> int:
    lengths = {name: len(values) for name, values in samples.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"traces: columns must have equal lengths; got {lengths}")
    return next(iter(lengths.values()), 0)


def seal_shard(directory: Path, blocks: list[Block], level: int) -> Path:
    """Records (of one rank and attempt) into one shard: written under .staging/, fsynced, renamed into
    place, directory fsynced."""
    block = merge(blocks, level)
    a = block.attrs
    steps = np.concatenate([block.step, block.m_step])
    name = f"{file_prefix(a['rank'], a['attempt'])}.steps{steps.min():08d}-{steps.max():08d}.c{a['seq_first']:08d}.h5"
    tmp = directory / ".staging" / f"{name}.tmp"
    image = shard_image(block)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(image)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
        fsync_path(directory)  # the shard's name must be durable before the journal it replaces goes
    except OSError as err:
        err.filename = err.filename or str(tmp)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or failed filesystem: the next start clears .staging
        raise
    return directory / name


def shard_image(block: Block) -> bytes:
    """The bytes of a shard holding ``block``, built by HDF5 in memory: HDF5 never writes the disk, so a
    write error is a plain OSError of ours, not an HDF5 library left in a state that crashes at close."""
    with h5py.File(f"shard-{id(block)}.h5", "w", driver="core", backing_store=False, libver=LIBVER) as h5:
        write_shard(h5, block)
        h5.flush()
        return h5.id.get_file_image()


def storage_error(doing: str, path: Path, err: OSError, intact: str) -> TraceStorageError:
    """rlarith.durable's paragraph for a storage error (which file, what happened, what is intact, what to
    do), as this writer's ``TraceStorageError``, with the way out traces have: another folder."""
    intact += (
        " Traces can also go to another folder (traces.dir=...) or be turned off (traces.enabled=false)."
    )
    error = TraceStorageError(str(durable.storage_error(doing, err.filename or path, err, intact)))
    error.errno = err.errno
    return error


def _shard_seqs(directory: Path, prefix: str) -> list[tuple[int, int]]:
    out = []
    for path in directory.glob(f"{prefix}.steps*.h5"):
        with h5py.File(path, "r", locking=False) as h5:
            out.append((int(h5.attrs["seq_first"]), int(h5.attrs["seq_last"])))
    return out
