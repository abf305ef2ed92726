"""Traces on hostile scratch, with real filesystem faults (tests/fsfaults.py): a full tmpfs, an ext4 image
flipped read-only or crashed mid-run, folders removed under a running writer, a folder shared by two runs,
and steps that metrics.jsonl has and the traces lack."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fsfaults import fill, unfill
from test_traces import TEXTS, samples, untimed
from test_train import small

from conftest import cli, start, wait_for
from rlarith import traces
from rlarith.checkpoints import valid_checkpoints
from rlarith.cli import main
from rlarith.config import TraceConfig, load_config, save_config
from rlarith.contamination import TracesUnreadable, trained_keys
from rlarith.runlock import RunLocked

ROOT = Path(__file__).resolve().parents[1]

# A writer in its own process (a crash in HDF5 must not take pytest down): writes steps from argv[2] on
# until argv[3], printing each acknowledged step; ends with close().
CHILD = """
import random, sys
from rlarith import traces
from rlarith.config import TraceConfig
TEXTS = {texts!r}
{samples}
d, first, last, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
w = traces.TraceWriter(d, run_id="run", rank=0, attempt="a" + sys.argv[2], attempt_seq=first,
                       cfg=TraceConfig(shard_steps=4), resume_step=first - 1)
for step in range(first, last + 1):
    w.write_step(step, samples(step, n=n))
    print(step, flush=True)
w.close()
"""


@pytest.fixture(autouse=True)
def no_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCRATCH", raising=False)  # default trace folders: <run dir>/traces


def child(d: Path, first: int, last: int, n: int = 64) -> subprocess.CompletedProcess:
    script = CHILD.format(texts=TEXTS, samples=inspect.getsource(samples))
    return subprocess.run(
        [sys.executable, "-c", script, str(d), str(first), str(last), str(n)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )


def acked(proc: subprocess.CompletedProcess) -> list[int]:
    return [int(x) for x in proc.stdout.split()]


def one_paragraph(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The child failed with exit 1 (not 139: no segfault), the error is ours, one paragraph, no HDF5 spam."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Can't decrement" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[
        -3000:
    ]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlarith.traces.format.TraceStorageError: "), last
    for word in words:
        assert word in last, last
    return last


def test_a_full_trace_disk_is_one_paragraph_not_a_segfault_and_nothing_is_lost(small_tmpfs):
    """Before: HDF5 failing to write a shard on a full disk crashed the interpreter (exit 139) after
    screens of "Can't decrement id ref count", while writing and again at the next start's recovery."""
    scratch = small_tmpfs("2M")
    fill(scratch, leave=400 * 1024)  # someone else's files: the traces get the last 400 KiB
    d = scratch / "traces"
    first = child(d, 1, 400)
    one_paragraph(
        first, "No space left on device", "ENOSPC", "Intact:", "To go on:", "Sealing a shard of traces"
    )
    written = acked(first)
    assert 4 < len(written) < 400  # some shards sealed, then the disk filled
    assert not list((d / ".staging").iterdir()), "a failed shard leaves no temporary file"
    # The next start, disk still full: recovering the journal fails the same way, without a crash.
    again = child(d, written[-1] + 1, written[-1] + 1)
    one_paragraph(again, "No space left on device", "Recovering the trace journals")
    unfill(scratch)  # space freed: the next start seals the journal, and nothing acknowledged is lost
    last = child(d, written[-1] + 1, written[-1] + 2, n=2)
    assert last.returncode == 0, last.stderr[-3000:]
    assert traces.open(d).steps()["step"].tolist() == list(range(1, written[-1] + 3))


def test_a_trace_disk_flipped_read_only_mid_run_says_so_and_keeps_what_was_written(ext4_image):
    disk = ext4_image("32M")
    d = disk.path / "traces"
    w = traces.TraceWriter(
        d, run_id="run", rank=0, attempt="a", attempt_seq=1, cfg=TraceConfig(shard_steps=4)
    )
    for step in range(1, 8):  # 1-4 sealed into a shard, 5-7 in the journal
        w.write_step(step, samples(step))
        if step == 6:
            w.sync()  # a checkpoint of step 6
    disk.flip_read_only()  # a real ext4 error: the kernel aborts its journal and remounts read-only
    with pytest.raises(traces.TraceStorageError) as err:
        w.write_step(8, samples(8))
    text = str(err.value)
    assert "Read-only file system" in text and "EROFS" in text and str(d / "pending") in text
    assert "rank0000.a.00000004.journal" in text  # what is intact, by name
    assert "steps 5-6: fsynced" in text and "step 7: written, not yet fsynced" in text
    w.close()  # after a storage error: lets go, raises nothing more (no chained traceback)
    disk.remount()
    assert traces.open(d).steps()["step"].tolist()[:6] == list(range(1, 7))


def test_traces_survive_a_crash_up_to_the_last_sync(ext4_image):
    """``sync`` (called by the trainer at every checkpoint save, before the seal) makes the journal's steps
    survive a crashed filesystem; without it the journal came back empty (0 bytes) after a crash."""
    disk = ext4_image("32M")
    d = disk.path / "traces"
    w = traces.TraceWriter(
        d, run_id="run", rank=0, attempt="a", attempt_seq=1, cfg=TraceConfig(shard_steps=8)
    )
    for step in range(1, 4):
        w.write_step(step, samples(step))
    w.sync()  # a checkpoint of step 3 is sealed after this
    w.write_step(4, samples(4))  # not synced: a crash may take it
    disk.crash()
    with pytest.raises(traces.TraceStorageError, match="EIO"):  # the writer's process dies with the node
        w.close()
    disk.remount()
    assert traces.open(d).steps()["step"].tolist()[:3] == [1, 2, 3]


def test_fsync_steps_makes_every_step_survive_a_crash(ext4_image):
    disk = ext4_image("32M")
    d = disk.path / "traces"
    cfg = TraceConfig(shard_steps=8, fsync_steps=True)
    w = traces.TraceWriter(d, run_id="run", rank=0, attempt="a", attempt_seq=1, cfg=cfg)
    for step in range(1, 5):
        w.write_step(step, samples(step))
    disk.crash()
    with pytest.raises(traces.TraceStorageError, match="EIO"):
        w.close()
    disk.remount()
    assert traces.open(d).steps()["step"].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("purge", ["folder", "staging", "journal"])
def test_a_purge_during_the_run_is_survived_and_said_once(tmp_path, caplog, purge):
    """Before: the next seal died with a raw FileNotFoundError on .staging/....h5.tmp and the steps held
    in memory were lost."""
    d = tmp_path / "traces"
    w = traces.TraceWriter(
        d, run_id="run", rank=0, attempt="a", attempt_seq=1, cfg=TraceConfig(shard_steps=4)
    )
    for step in range(1, 7):  # steps 1-4 sealed, 5-6 in the journal
        w.write_step(step, samples(step))
    {"folder": lambda: shutil.rmtree(d), "staging": lambda: shutil.rmtree(d / ".staging"),
     "journal": lambda: shutil.rmtree(d / "pending")}[purge]()  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="rlarith"):
        for step in range(7, 11):  # crosses a seal (5-8) and leaves 9-10 in a new journal
            w.write_step(step, samples(step))
        if purge == "folder":
            shutil.rmtree(d)  # twice: said once
        w.close()
    said = [r.getMessage() for r in caplog.records if "removed while this run wrote" in r.getMessage()]
    assert len(said) == 1, said
    assert "made it again" in said[0] and "(5-6) held in memory" in said[0], said[0]
    # What the purge took is gone (the first removal took shard 1-4, the second 5-8); the rest is there.
    steps = traces.open(d).steps()["step"].tolist()
    assert steps == ([9, 10] if purge == "folder" else list(range(1, 11)))
    assert untimed(traces.open(d).records())[-1]["step"] == 10


# ---- one folder, one run ----------------------------------------------------------------------------------


def writer_for(d: Path, run_dir: Path, run_id: str = "run-1") -> traces.TraceWriter:
    return traces.TraceWriter(
        d, run_id=run_id, rank=0, attempt="a", attempt_seq=1, cfg=TraceConfig(), run_dir=run_dir
    )


def test_the_default_trace_folder_is_per_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    a = load_config(overrides=["name=same", f"runs_dir={tmp_path / 'a'}"])
    b = load_config(overrides=["name=same", f"runs_dir={tmp_path / 'b'}"])
    assert a.trace_dir != b.trace_dir
    assert a.trace_dir.parent.name.startswith("same-") and a.trace_dir.is_relative_to(tmp_path / "scratch")
    assert traces.run_trace_dir(a.run_dir, a) == a.trace_dir


def test_a_trace_folder_belongs_to_one_run_directory(tmp_path):
    shared = tmp_path / "scratch" / "traces"
    first, second = tmp_path / "runs1" / "x", tmp_path / "runs2" / "x"
    first.mkdir(parents=True), second.mkdir(parents=True)
    with writer_for(shared, first) as w:
        w.write_step(1, samples(1))
        with pytest.raises(RunLocked, match="in use by"):  # two at once: the lock
            writer_for(shared, second)
    assert json.loads((shared / "run.json").read_text())["run_dir"] == str(first.resolve())
    # Later: the same name (and config) in another runs_dir, or a copy: refused, naming both and the fix.
    with pytest.raises(traces.TraceFolderTaken) as err:
        writer_for(shared, second)
    text = str(err.value)
    assert str(first.resolve()) in text and str(second.resolve()) in text and "rsync -a --delete" in text
    with pytest.raises(traces.TraceFolderTaken, match="of run run-1, and this run directory"):
        writer_for(shared, second, run_id="run-2")
    # The run directory moved (the recorded one is gone): the folder follows it.
    moved = tmp_path / "moved" / "x"
    moved.parent.mkdir()
    first.rename(moved)
    writer_for(shared, moved).close()
    assert json.loads((shared / "run.json").read_text())["run_dir"] == str(moved.resolve())
    # A copy that carries its traces inside it owns that copy.
    inside = moved / "traces"
    writer_for(inside, moved).close()
    copy = tmp_path / "copy" / "x"
    shutil.copytree(moved, copy)
    writer_for(copy / "traces", copy).close()
    assert json.loads((copy / "traces" / "run.json").read_text())["run_dir"] == str(copy.resolve())


def test_a_trace_folder_flipped_read_only_under_training_ends_in_one_paragraph(
    sft_model, ext4_image, tmp_path
):
    """Before: a chained traceback. Now: rlarith's storage error paragraph and exit 74 (not 75: no requeue
    into the same disk); the run directory, elsewhere, is untouched."""
    disk, log = ext4_image("64M"), tmp_path / "log"
    args = small(sft_model, tmp_path, "ro", f"traces.dir={disk.path / 'traces'}", "training.max_steps=8")
    proc = start(["train", *args], log)
    wait_for(lambda: any((disk.path / "traces" / "pending").glob("*.journal")) or proc.poll() is not None)
    disk.flip_read_only()
    assert proc.wait(timeout=300) == 74, log.read_text()[-3000:]
    text = log.read_text()
    said = [line for line in text.splitlines() if line.startswith("rlarith: storage error: ")]
    assert len(said) == 1 and "Traceback" not in text, text[-3000:]
    assert "trace journal failed" in said[0] and "read-only" in said[0] and "Intact:" in said[0]


def test_a_folder_that_mixes_two_runs_says_so(tmp_path):
    """Folders written before ownership was checked can hold two runs' steps: the summary names both."""
    for run_id, seq in (("add-1", 1), ("mul-2", 2)):
        with traces.TraceWriter(
            tmp_path, run_id=run_id, rank=0, attempt=f"a{seq}", attempt_seq=seq, cfg=TraceConfig()
        ) as w:
            w.write_step(1, samples(1))
    text = traces.format_summary(traces.open(tmp_path).summary())
    assert "NOTE run ids: add-1, mul-2: a forced config change, or the steps of two runs mixed" in text


def test_train_refuses_a_run_directory_whose_trace_folder_belongs_to_another_before_loading(tmp_path):
    """A copied run directory resumed elsewhere with the same traces.dir used to write its steps into the
    original's traces; now the trainer refuses in its preflight, before any model is loaded."""
    model = tmp_path / "model"  # never loaded: a config.json is all the preflight looks at
    model.mkdir()
    (model / "config.json").write_text("{}")
    shared, original = tmp_path / "scratch" / "traces", tmp_path / "runs" / "x"
    original.mkdir(parents=True)
    writer_for(shared, original).close()
    args = ["train", "name=x", f"runs_dir={tmp_path / 'copy'}", f"model.path={model}", f"traces.dir={shared}"]
    r = cli(args)
    assert r.returncode == 2, r.stderr[-3000:]
    assert (
        f"belongs to the run directory {str(original.resolve())!r}" in r.stderr
        and "rsync -a --delete" in r.stderr
    )
    assert "Loading" not in r.stderr and not (tmp_path / "copy" / "x" / "logs").exists()


# ---- gaps are said --------------------------------------------------------------------------------------


def run_with_metrics(tmp_path: Path, steps: range) -> Path:
    cfg = load_config(overrides=["name=gappy", f"runs_dir={tmp_path}"])
    cfg.run_dir.mkdir(parents=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    lines = [{"time": "t", "step": s, "loss": 0.1} for s in steps]
    (cfg.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return cfg.run_dir


def test_steps_metrics_has_and_traces_lack_are_named_everywhere(tmp_path, capsys):
    run_dir = run_with_metrics(tmp_path, range(1, 31))
    with writer_for(run_dir / "traces", run_dir) as w:
        for step in range(1, 31):
            w.write_step(step, samples(step))
    for shard in sorted((run_dir / "traces").glob("*.h5")):
        shard.unlink()  # a purge of the oldest traces, say
    (run_dir / "traces" / "pending").mkdir(exist_ok=True)
    with writer_for(run_dir / "traces", run_dir) as w:
        w.write_step(31, samples(31))
    (run_dir / "metrics.jsonl").open("a").write(json.dumps({"time": "t", "step": 31, "loss": 0.1}) + "\n")
    tr = traces.open(run_dir)
    assert tr.missing() == [(1, 30)]
    sentence = f"traces for steps 1-30 are missing from {str(run_dir / 'traces')!r}: purged or lost"
    assert main(["traces", "summary", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert f"MISSING {sentence}" in out and "metrics.jsonl" in out
    assert f"run: {run_dir.resolve()} (run id run-1; the folder's run.json)" in out
    assert main(["traces", "export", str(run_dir), "--format", "jsonl"]) == 1
    assert sentence in capsys.readouterr().err
    assert traces.trace_gaps(run_dir / "traces", run_dir).startswith(sentence)  # what a resume logs
    cfg = load_config(run_dir / "config.yaml")
    with pytest.raises(TracesUnreadable, match="steps 1-30 are missing"):  # as unreadable traces are
        trained_keys(run_dir, cfg)
    assert trained_keys(run_dir, cfg, force=True)


def test_a_trace_folder_gone_altogether_is_named(tmp_path, capsys):
    run_dir = run_with_metrics(tmp_path, range(1, 21))
    assert main(["traces", "summary", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"its trace folder {str(run_dir / 'traces')!r}" in err and "steps 1-20 are missing" in err
    with pytest.raises(TracesUnreadable, match="steps 1-20 are missing"):
        trained_keys(run_dir, load_config(run_dir / "config.yaml"))


# ---- the trainer -----------------------------------------------------------------------------------------


def test_a_node_crash_after_a_checkpoint_keeps_the_traces_up_to_it(sft_model, ext4_image, tmp_path):
    """A real training run on an ext4 image: SIGKILL once checkpoint-2 is sealed, then the filesystem
    crashes (what was not fsynced is lost). The traces of steps 1-2 are there, because the trainer syncs
    them before it seals a checkpoint; before, the journal came back at 0 bytes and the resume started past
    traces that were gone. Then a purge of the traces between attempts: the resume names the lost steps
    (before: exit 0 and no word)."""
    disk = ext4_image("256M")
    run_dir, log = disk.path / "crash", tmp_path / "log"
    proc = start(["train", *small(sft_model, disk.path, "crash", "training.max_steps=6")], log)
    try:
        wait_for(
            lambda: (
                (run_dir / "checkpoints" / "checkpoint-2" / "COMPLETE").exists() or proc.poll() is not None
            )
        )
    finally:
        proc.kill()
        proc.wait()
    assert (run_dir / "checkpoints" / "checkpoint-2" / "COMPLETE").exists(), log.read_text()[-3000:]
    disk.crash()
    disk.remount()
    tr = traces.open(run_dir)
    assert {1, 2} <= set(tr.steps()["step"].tolist()), sorted((run_dir / "traces").rglob("*"))
    assert tr.missing() == [] or tr.missing()[0][0] > 2
    # Then scratch is purged between attempts: the resume says which steps the traces lack, and trains on.
    shutil.rmtree(run_dir / "traces")
    log.write_text("")
    resumed = max(step for step, _ in valid_checkpoints(run_dir))  # 2 (4 if the kill came late)
    proc = start(["train", *small(sft_model, disk.path, "crash", "training.max_steps=6")], log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    said = f"traces for steps 1-{resumed} are missing from {str(run_dir / 'traces')!r}: purged or lost"
    assert said in log.read_text(), log.read_text()[-3000:]
    assert traces.open(run_dir).steps()["step"].tolist() == list(range(resumed + 1, 7))


def test_a_crash_emptied_config_yaml_still_finds_the_configured_trace_folder(tmp_path):
    """config.yaml emptied by a crash is not the default config (whose trace folder is another one): the
    reader takes the config sealed into the latest checkpoint, says so, and finds the traces; with no such
    copy it refuses, naming the file."""
    from test_run_integrity import FILES, stage

    from rlarith.checkpoints import checkpoint_path, seal
    from rlarith.config import flat

    cfg = load_config(overrides=["name=r", f"runs_dir={tmp_path}", f"traces.dir={tmp_path / 'elsewhere'}"])
    cfg.run_dir.mkdir(parents=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    with writer_for(cfg.trace_dir, cfg.run_dir) as w:
        w.write_step(1, samples(1))
    (cfg.run_dir / "config.yaml").write_bytes(b"")
    with pytest.raises(traces.TraceError, match="config.yaml: .*empty"):
        traces.open(cfg.run_dir)
    seal(stage(cfg.run_dir, 2), checkpoint_path(cfg.run_dir, 2), {"config": flat(cfg)}, required=list(FILES))
    with pytest.warns(UserWarning, match="using the config sealed into .*checkpoint-2"):
        tr = traces.open(cfg.run_dir)
    assert tr.directory == cfg.trace_dir
