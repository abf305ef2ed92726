"""The overlapped save's parts, on real tensors and files: the snapshot, the captured serializers, the
writer and its rank markers. The end-to-end guarantees (exact resume, SIGKILL and stops during a background
write) are in tests/test_train.py."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlarith import manifest
from rlarith.durable import StorageError
from rlarith.training.async_save import MARKER, BackgroundWriter, HostBuffers, Snapshot, capture


def test_a_snapshot_is_a_copy_that_keeps_storage_sharing_and_types() -> None:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = OrderedDict(
        weight=weight,
        tied=weight,  # one storage, as tied embeddings are
        row=weight[1],  # a view into it
        param=torch.nn.Parameter(torch.ones(2)),
        step=torch.tensor(7),
        meta={"lr": 1e-3, "betas": (0.9, 0.999), "shape": torch.Size([3, 4])},
    )
    staged = Snapshot(HostBuffers()).stage(state)
    weight.add_(100)  # training goes on: the snapshot must not move
    assert type(staged) is OrderedDict and list(staged) == list(state)
    assert staged["weight"].tolist() == (torch.arange(12.0).reshape(3, 4)).tolist()
    assert staged["tied"].untyped_storage().data_ptr() == staged["weight"].untyped_storage().data_ptr()
    assert staged["row"].storage_offset() == 4 and staged["row"].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert type(staged["param"]) is torch.nn.Parameter and staged["step"].item() == 7
    assert staged["meta"] == state["meta"] and staged["meta"] is not state["meta"]


def test_host_buffers_are_reused_from_one_save_to_the_next() -> None:
    buffers = HostBuffers()
    state = {"a": torch.randn(100), "b": torch.randn(50)}
    first = Snapshot(buffers).stage(state)
    second = Snapshot(buffers).stage({k: v + 1 for k, v in state.items()})
    assert second["a"].untyped_storage().data_ptr() == first["a"].untyped_storage().data_ptr()
    assert buffers.nbytes == 150 * 4
    Snapshot(buffers).stage({"a": torch.randn(10), "b": torch.randn(50)})  # a size changed: a new buffer
    assert buffers.nbytes == 60 * 4


def test_capture_queues_both_serializers_and_the_writer_writes_what_they_would(tmp_path: Path) -> None:
    import safetensors.torch
    import transformers.modeling_utils

    optimizer = {"state": {0: {"exp_avg": torch.randn(4, 4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    weights = {"w": torch.randn(3, 3)}
    snapshot = Snapshot(HostBuffers())
    with capture(snapshot):
        torch.save(optimizer, tmp_path / "optimizer.pt")
        safetensors.torch.save_file(weights, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
        transformers.modeling_utils.safe_save_file(weights, str(tmp_path / "b.safetensors"))
        (tmp_path / "small.json").write_text("{}")  # everything else writes as usual
    assert not any(tmp_path.glob("*.pt")) and not any(tmp_path.glob("*.safetensors")), "queued, not written"
    assert [w.path.name for w in snapshot.writes] == ["optimizer.pt", "a.safetensors", "b.safetensors"]
    expected = {k: v.clone() for k, v in weights.items()}, optimizer["state"][0]["exp_avg"].clone()
    weights["w"].zero_(), optimizer["state"][0]["exp_avg"].zero_()  # the state moves on before the write
    writer = BackgroundWriter(rank=0, world_size=1)
    sealed: list[dict] = []
    writer.submit(snapshot, tmp_path, lambda seconds, known: sealed.append(known))
    writer.wait()
    assert len(sealed) == 1 and not (tmp_path / MARKER.format(rank=0)).exists(), "markers go before the seal"
    # the checksums taken while writing (streamed or read back) are those a read of the files gives
    on_disk = manifest.record(tmp_path)["files"]
    assert sealed[0] == {name: entry for name, entry in on_disk.items() if name != "small.json"}
    loaded = torch.load(tmp_path / "optimizer.pt")
    assert torch.equal(loaded["state"][0]["exp_avg"], expected[1]) and loaded["param_groups"][0]["lr"] == 0.1
    for name in ("a", "b"):
        assert torch.equal(load_file(tmp_path / f"{name}.safetensors")["w"], expected[0]["w"])
    # the serializers are restored after the block
    assert torch.save.__module__ == "torch.serialization"
    assert transformers.modeling_utils.safe_save_file is safetensors.torch.save_file


def test_rank_zero_seals_only_once_every_rank_has_written(tmp_path: Path) -> None:
    sealed = threading.Event()
    zero, one = BackgroundWriter(rank=0, world_size=2), BackgroundWriter(rank=1, world_size=2)
    known: dict[str, dict] = {}
    zero.submit(
        Snapshot(HostBuffers()), tmp_path, lambda seconds, entries: (known.update(entries), sealed.set())
    )
    time.sleep(0.3)
    assert zero.busy and not sealed.is_set(), "rank 0 must wait for rank 1's files"
    snapshot = Snapshot(HostBuffers())
    (tmp_path / "global_step1").mkdir()
    with capture(snapshot):
        torch.save({"x": torch.ones(3)}, tmp_path / "global_step1" / "rank1_optim_states.pt")
    one.submit(snapshot, tmp_path, None)
    one.wait(), zero.wait()
    assert sealed.is_set() and not list(tmp_path.glob(".written-*"))
    assert known == manifest.record(tmp_path)["files"], "rank 1's checksums reach rank 0 in its marker"


def test_a_failed_background_write_is_raised_in_the_training_thread_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / ".staging" / "checkpoint-4"
    folder.mkdir(parents=True)
    snapshot = Snapshot(HostBuffers())
    with capture(snapshot):
        torch.save({"x": torch.ones(1)}, folder / "gone" / "optimizer.pt")  # its folder does not exist
    writer = BackgroundWriter(rank=0, world_size=1)
    sealed: list[float] = []
    writer.submit(snapshot, folder, lambda seconds, known: sealed.append(seconds))
    with pytest.raises(StorageError, match=f"background write of checkpoint-4 failed: {folder}/gone/optimizer.pt: "
                       "a folder on its path was removed.*never sealed.*no valid checkpoint yet"):  # fmt: skip
        writer.wait()
    assert not sealed
    assert writer.wait() == pytest.approx(0, abs=0.1)  # reported once; the writer is usable again


def test_a_digesting_writer_records_what_a_read_back_gives_and_starts_writeback(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(manifest.DigestingWriter, "WRITEBACK_BYTES", 4096)
    data = torch.randint(0, 256, (300_000,), dtype=torch.uint8).numpy()
    path = tmp_path / "f.bin"
    with open(path, "wb") as raw:
        out = manifest.DigestingWriter(raw)
        for start in range(0, len(data), 70_000):  # uneven chunks, a memoryview among them
            out.write(memoryview(data[start : start + 70_000]))
        started = out.started
    size, digest = manifest.digest_file(path)
    assert out.entry() == {"size": size, manifest.ALGORITHM: digest} and size == 300_000
    assert path.read_bytes() == data.tobytes()
    assert 0 < started <= size, "writeback was started while writing"


def test_record_takes_a_known_entry_only_while_the_file_keeps_its_size(tmp_path: Path) -> None:
    (tmp_path / "a.pt").write_bytes(b"12345")
    (tmp_path / "b.pt").write_bytes(b"123")
    stale = {"size": 5, manifest.ALGORITHM: "0" * 32}
    got = manifest.record(tmp_path, known={"a.pt": stale, "b.pt": stale})["files"]
    assert got["a.pt"] == stale, "taken as it is: no read"
    assert got["b.pt"] == {"size": 3, manifest.ALGORITHM: manifest.digest_file(tmp_path / "b.pt")[1]}


def test_the_gil_switch_interval_is_short_only_while_a_write_is_in_flight(
    tmp_path: Path, monkeypatch
) -> None:
    import sys

    from rlarith.training import async_save

    monkeypatch.setenv("RLARITH_TEST_WRITE_DELAY_S", "0.5")
    before = sys.getswitchinterval()
    writer = BackgroundWriter(rank=0, world_size=1)
    writer.submit(Snapshot(HostBuffers()), tmp_path, None)
    time.sleep(0.2)
    assert writer.busy and sys.getswitchinterval() == pytest.approx(async_save.SWITCH_INTERVAL_S)
    writer.wait()
    assert sys.getswitchinterval() == before
