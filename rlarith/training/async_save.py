"""Checkpoints off the critical path: the step pays for a copy of the state into host memory; a thread
writes it, and rank 0 seals it exactly as a synchronous save does.

How: while the HF Trainer (and DeepSpeed under it) saves into the staging folder, ``capture`` replaces the
two serializers every large file goes through, ``torch.save`` and safetensors' ``save_file``, with a
snapshot: every tensor storage the call would write is copied into a host buffer (allocated at the first
save and reused after; pinned when the source is on a GPU), and the call itself is queued. Small files
(JSON, tokenizer, DeepSpeed's ``latest``) are written as usual. ``BackgroundWriter`` then runs the queued
calls with the real serializers on the copies, fsyncs each file, and drops a ``.written-rank<r>`` marker
that holds the files' checksums; rank 0's writer waits for every rank's marker, removes them and runs the
seal (``rlarith.checkpoints.seal``: checksums, ``COMPLETE`` last, rename), the pruning and the report.
``torch.save`` (the optimizer state: two thirds of an AdamW checkpoint) streams through a
``manifest.DigestingWriter``, which hashes the bytes as they pass and starts the disk writes as it goes, so
the seal does not read those files back; safetensors writes only to a path and is read back once. A
checkpoint is still valid only once sealed: a crash or SIGKILL during the background write leaves a
staging folder, removed at the next start, and the previous valid checkpoint.

The files are those a synchronous save writes, from the same objects by the same serializers, so resuming
is unchanged. Two things differ in the bytes, not in what loads: ``torch.save`` into a stream names the
zip's folder ``archive/`` (into a path, after the file), and on a GPU its tensors are recorded as CPU
tensors, which every loader on the resume path maps to its device anyway.

Rules: at most one write in flight (the next save waits for it, and says so when it waits); a stop
request and the final step wait for it too, then save synchronously, so an exit 75 always follows a sealed
checkpoint. No collective runs in the background thread: ranks meet through marker files in the folder.

Why not PyTorch DCP's ``async_save`` (what torchtitan's async checkpointing runs on): it writes DCP's own
format, which neither the HF Trainer's resume nor DeepSpeed's reads; the ideas taken from both are the
staging into reused (pinned) host buffers, one save in flight, and waiting for it before the next.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from rlarith import manifest
from rlarith.checkpoints import intact_after_failed_save, step_of
from rlarith.durable import StorageError, os_error, storage_error, write_atomic

MARKER = ".written-rank{rank}"
"""Dropped in the checkpoint folder by each rank once its files are written and fsync'd: their checksum
entries (``CHECKSUMS.json``'s form, by path relative to the folder), as JSON."""
RANKS_TIMEOUT_S = 1800.0
"""How long rank 0's writer waits for the other ranks' markers before it gives the checkpoint up."""
SWITCH_INTERVAL_S: float | None = 0.001
"""Python's GIL switch interval while a write is in flight (None: leave it). The writer takes the GIL
hundreds of times per file, each time waiting up to the interval (5 ms by default) when the training
thread runs Python: an 880 MiB write took 5.1 s against a busy Python thread instead of 1.0 s idle, and
2.0 s at 1 ms, the busy thread keeping the same pace (benchmarks/writer_gil.py)."""


class HostBuffers:
    """Host memory for snapshots, allocated at the first save and reused by the next ones (a fresh 1.3 GB
    allocation costs page faults: twice the copy itself, benchmarks/README.md). Slot ``i`` is the ``i``-th
    storage copied in a save: the same state gives the same order at every save."""

    def __init__(self) -> None:
        self._slots: list[Any] = []  # torch.UntypedStorage

    def get(self, slot: int, nbytes: int, pin: bool) -> Any:
        import torch

        if slot < len(self._slots) and self._slots[slot].nbytes() == nbytes:
            return self._slots[slot]
        buffer = torch.UntypedStorage(nbytes, device="cpu")
        if pin:
            buffer = buffer.pin_memory()
        if slot < len(self._slots):
            self._slots[slot] = buffer
        else:
            self._slots.append(buffer)
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self._slots)


class Write(NamedTuple):
    """One queued serializer call: ``write(target)`` writes the file ``path``; ``target`` is a writable
    stream when ``streams``, else the path itself."""

    path: Path
    write: Callable[[Any], None]
    streams: bool


class Snapshot:
    """What one rank's save would have written: queued serializer calls on host copies of the state."""

    def __init__(self, buffers: HostBuffers) -> None:
        self.buffers = buffers
        self.writes: list[Write] = []
        self.nbytes = 0
        self._slot = 0
        self._on_gpu = False

    def stage(self, obj: Any, memo: dict[Any, Any] | None = None) -> Any:
        """A copy of ``obj`` whose tensors live in host buffers. Storage sharing is kept (two tensors on
        one storage stay on one copy), so the serializer writes the same records it would have."""
        import torch

        memo = {} if memo is None else memo
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            return self._stage_tensor(obj, memo)
        if isinstance(obj, torch.Tensor):  # a subclass we do not know how to rebuild
            return obj.detach().to("cpu", copy=True)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the dict's type (OrderedDict, defaultdict)
            for key, value in obj.items():
                out[key] = self.stage(value, memo)
            return out
        if isinstance(obj, list):
            return [self.stage(value, memo) for value in obj]
        if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
            items = [self.stage(value, memo) for value in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return copy.deepcopy(obj)  # numbers, strings, numpy RNG states, TrainingArguments

    def _stage_tensor(self, tensor: Any, memo: dict[Any, Any]) -> Any:
        import torch

        storage = tensor.untyped_storage()
        key = (storage.device, storage.data_ptr(), storage.nbytes())
        if key not in memo:
            on_gpu = storage.device.type != "cpu"
            buffer = self.buffers.get(self._slot, storage.nbytes(), pin=on_gpu)
            self._slot += 1
            buffer.copy_(storage, non_blocking=on_gpu)
            self._on_gpu |= on_gpu
            self.nbytes += storage.nbytes()
            memo[key] = buffer
        staged = torch.empty((0,), dtype=tensor.dtype, device="cpu")
        staged.set_(memo[key], tensor.storage_offset(), tensor.size(), tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(staged, requires_grad=tensor.requires_grad)
        if tensor.requires_grad:
            staged.requires_grad_(True)
        return staged

    def finish(self) -> None:
        """Wait for the device-to-host copies (issued non-blocking) before training changes the state."""
        if self._on_gpu:
            import torch

            torch.cuda.synchronize()


@contextmanager
def capture(snapshot: Snapshot) -> Iterator[None]:
    """Within the block, ``torch.save`` and safetensors' ``save_file`` to a path stage their tensors into
    ``snapshot`` and queue the write instead of writing. Everything else writes as usual."""
    import safetensors.torch
    import torch
    import transformers.modeling_utils as modeling_utils

    real_torch_save, real_save_file = torch.save, safetensors.torch.save_file

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(f, (str, os.PathLike)):
            return real_torch_save(obj, f, *args, **kwargs)
        staged = snapshot.stage(obj)
        write = lambda target: real_torch_save(staged, target, *args, **kwargs)  # noqa: E731
        snapshot.writes.append(Write(Path(f), write, streams=True))
        return None

    def save_file(tensors: dict[str, Any], filename: Any, *args: Any, **kwargs: Any) -> None:
        staged = snapshot.stage(tensors)
        write = lambda target: real_save_file(staged, str(target), *args, **kwargs)  # noqa: E731
        snapshot.writes.append(Write(Path(filename), write, streams=False))

    patched = [(torch, "save", torch_save), (safetensors.torch, "save_file", save_file)]
    patched.append((modeling_utils, "safe_save_file", save_file))  # bound at import in transformers
    saved = [(module, name, getattr(module, name)) for module, name, _ in patched]
    for module, name, replacement in patched:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
        snapshot.finish()


class BackgroundWriter:
    """One rank's writer: at most one checkpoint in flight. ``submit`` starts the write of a snapshot;
    ``wait`` blocks until it is done (and re-raises its error in the training thread)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.folder: Path | None = None  # the checkpoint in flight

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(
        self, snapshot: Snapshot, folder: Path, seal: Callable[[float, dict[str, dict]], None] | None
    ) -> None:
        """Write ``snapshot``'s files into ``folder`` and mark them done; on rank 0 (``seal`` given) wait
        for every rank's marker, then call ``seal(seconds the write took, every rank's checksum entries)``."""
        self.wait()
        self.folder = folder

        def work() -> None:
            started = time.time()
            previous = sys.getswitchinterval()
            if SWITCH_INTERVAL_S is not None:
                sys.setswitchinterval(min(previous, SWITCH_INTERVAL_S))
            try:
                time.sleep(float(os.environ.get("RLARITH_TEST_WRITE_DELAY_S", "0")))  # tests: a slow disk
                written = {}
                for queued in snapshot.writes:
                    name = os.path.relpath(queued.path, folder)
                    entry = _write(queued)
                    if not name.startswith(".."):
                        written[Path(name).as_posix()] = entry
                marker = folder / MARKER.format(rank=self.rank)
                write_atomic(marker, json.dumps(written), durable=True)
                if seal is not None:
                    markers = [folder / MARKER.format(rank=r) for r in range(self.world_size)]
                    deadline = time.time() + RANKS_TIMEOUT_S
                    while not all(m.exists() for m in markers):
                        if time.time() > deadline:
                            absent = [m.name for m in markers if not m.exists()]
                            raise TimeoutError(
                                f"{folder}: no {', '.join(absent)} after {RANKS_TIMEOUT_S:.0f} s"
                            )
                        time.sleep(0.02)
                    known: dict[str, dict] = {}
                    for m in markers:
                        known.update(json.loads(m.read_text()))
                        m.unlink()
                    seal(time.time() - started, known)
            except BaseException as err:  # re-raised by wait() in the training thread
                self._error = err
            finally:
                sys.setswitchinterval(previous)

        self._thread = threading.Thread(target=work, name=f"checkpoint-writer-{folder.name}", daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Block until the write in flight (if any) is done; the seconds waited. Raises its error."""
        started = time.time()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, StorageError):  # the seal's own paragraph
                raise err
            cause, step = os_error(err), step_of(self.folder)
            if cause is not None:
                intact = (  # the run dir holds checkpoints/.staging/<folder>
                    intact_after_failed_save(self.folder.parents[2], step)
                    if step is not None and len(self.folder.parents) > 2
                    else "It was never sealed, so it is not a checkpoint; the previous valid checkpoint is "
                    "intact and the next start resumes from it."
                )
                raise storage_error(
                    f"The background write of {self.folder.name}",
                    cause.filename or self.folder,
                    cause,
                    intact,
                ) from err
            raise RuntimeError(
                f"the background write of {self.folder} failed: {err}. It was never sealed, so it is not a "
                "checkpoint; the previous valid checkpoint is intact and the next start resumes from it."
            ) from err
        return time.time() - started


def _write(queued: Write) -> dict[str, Any]:
    """Run one queued serializer call, fsync the file; its checksum entry."""
    if not queued.streams:  # a serializer that writes only to a path: read back once for the checksum
        queued.write(queued.path)
        size, digest = manifest.digest_file(queued.path, fsync=True)
        return {"size": size, manifest.ALGORITHM: digest}
    with open(queued.path, "wb") as raw:
        out = manifest.DigestingWriter(raw)
        queued.write(out)
        raw.flush()
        os.fsync(raw.fileno())
    return out.entry()
