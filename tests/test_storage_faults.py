"""Real storage faults on the files a run writes (its traces are tests/test_traces.py's): a tmpfs that is
full, a loop-mounted ext4 image that turns read-only or crashes mid-run (tests/fsfaults.py). Each fault ends
in one paragraph that names the file, exit 74 (not 75: a requeue would meet the same disk), and nothing
already written is lost: the previous valid checkpoint resumes, the metrics of its steps are all there."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from fsfaults import fill, resize

from conftest import REPO, cli, start, wait_for
from rlarith import metrics
from rlarith.checkpoints import latest_verified, valid_checkpoints
from rlarith.config import load_run_config
from rlarith.durable import EXIT_STORAGE
from rlarith.preemption import EXIT_STOPPED

CHECKPOINT_MB = 13  # one checkpoint of the tiny model with AdamW state (checkpoint-<step>: 12.6 MiB)


def args(model: Path, runs: Path, traces: Path, steps: int, *extra: str) -> list[str]:
    """A short run of the tiny model; its traces on the test's own disk (only the run dir is faulted)."""
    return [
        "train", "--config", str(REPO / "configs" / "default.yaml"),
        "name=run", f"runs_dir={runs}", f"model.path={model}", f"traces.dir={traces}",
        f"training.max_steps={steps}", "training.prompts_per_step=4", "training.num_generations=4",
        "training.max_completion_length=5", "checkpoints.save_every=2", "checkpoints.reward_threshold=2.0",
        "checkpoints.save_on_best=false", "checkpoints.keep_best=false", "training.report_to=[]", *extra,
    ]  # fmt: skip


def logged_steps(run_dir: Path) -> list[int]:
    return sorted({r["step"] for r in metrics.read(run_dir) if "loss" in r})


def assert_one_paragraph(stderr: str, *words: str) -> str:
    """The error is one ``rlarith: storage error:`` paragraph holding ``words``; no traceback anywhere."""
    assert "Traceback" not in stderr and "During handling" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("rlarith: storage error: ")]
    for word in words:
        assert word in line, line
    return line


@pytest.mark.parametrize("save", ["final", "stop"])
def test_a_synchronous_save_on_a_full_disk_says_what_is_intact_and_the_run_resumes(
    sft_model, small_tmpfs, tmp_path, save
):
    """The run dir has room for one checkpoint, not two: the second save (the final one with
    checkpoints.overlap=false, or a stop's) fails on ENOSPC. One paragraph, exit 74 and not 75 (a stop
    asked for a requeue, but a requeue would meet the same full disk); checkpoint-2 is intact, and once
    there is room the next start resumes from it."""
    runs = small_tmpfs(f"{CHECKPOINT_MB + 7}M")
    log, overlap = tmp_path / "train.log", f"checkpoints.overlap={save != 'final'}"
    if save == "final":
        proc = start(args(sft_model, runs, tmp_path / "traces", 4, overlap), log)
    else:
        proc = start(args(sft_model, runs, tmp_path / "traces", 40), log)
        wait_for(lambda: valid_checkpoints(runs / "run"), timeout=300)
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_STORAGE != EXIT_STOPPED, log.read_text()[-3000:]
    line = assert_one_paragraph(
        log.read_text(),
        f"Writing checkpoint-{'4' if save == 'final' else ''}",
        f"{runs}/run/checkpoints/.staging/checkpoint-",
        "the filesystem is full",
        "The latest valid checkpoint, checkpoint-2, is intact and the next start resumes from it",
        "free space there",
    )
    assert "never sealed, so it is not a checkpoint" in line
    assert latest_verified(runs / "run").checkpoint == runs / "run" / "checkpoints" / "checkpoint-2"
    assert logged_steps(runs / "run")[:2] == [1, 2]

    resize(runs, f"{3 * CHECKPOINT_MB + 7}M")  # room made: the next start resumes and finishes
    (runs / "run" / "config.yaml").write_bytes(b"")  # and, say, a crash emptied config.yaml meanwhile
    again = cli(args(sft_model, runs, tmp_path / "traces", 4, overlap), timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming from" in again.stdout and "checkpoint-2" in again.stdout
    assert "config.yaml is empty (0 bytes): set aside, and written again" in again.stdout
    assert load_run_config(runs / "run").name == "run"
    assert logged_steps(runs / "run") == [1, 2, 3, 4]


def test_a_background_save_on_a_full_disk_is_the_same_paragraph(sft_model, small_tmpfs, tmp_path):
    """No room for even one checkpoint, saves overlapped: the background write of checkpoint-2 fails and
    the training thread reports it at the next save, as one paragraph (exit 74; it was exit 1 with a
    traceback around the message)."""
    runs = small_tmpfs(f"{CHECKPOINT_MB // 2}M")
    log = tmp_path / "train.log"
    status = start(args(sft_model, runs, tmp_path / "traces", 4), log).wait(timeout=300)
    assert status == EXIT_STORAGE, log.read_text()[-3000:]
    assert_one_paragraph(
        log.read_text(),
        "The background write of checkpoint-2 failed",
        f"{runs}/run/checkpoints/.staging/checkpoint-2/",
        "the filesystem is full",
        "There is no valid checkpoint yet: the next start begins from the model",
    )
    assert not valid_checkpoints(runs / "run")


def test_a_run_dir_that_turns_read_only_mid_run_is_one_paragraph_and_loses_nothing(
    sft_model, ext4_image, tmp_path
):
    """Mid-run the run dir's filesystem fails and is remounted read-only: the next write of the run
    (metrics.jsonl, its log, a checkpoint) ends the run with one paragraph, not a chained traceback, and
    every metrics record written before is still there."""
    disk = ext4_image("64M")
    log, run_dir = tmp_path / "train.log", disk.path / "run"
    proc = start(args(sft_model, disk.path, tmp_path / "traces", 40, "checkpoints.save_every=20"), log)
    wait_for(lambda: len(logged_steps(run_dir)) >= 2 if (run_dir / metrics.METRICS).exists() else False)
    disk.flip_read_only()
    before = logged_steps(run_dir)
    assert proc.wait(timeout=300) == EXIT_STORAGE, log.read_text()[-3000:]
    assert_one_paragraph(
        log.read_text(), f"{run_dir}/", "the filesystem is read-only", "no valid checkpoint yet"
    )
    assert set(before) <= set(logged_steps(run_dir))


def test_a_full_run_dir_mid_run_stops_at_the_metrics_with_one_paragraph(sft_model, small_tmpfs, tmp_path):
    """The run dir fills up mid-run: the logging callback's append to metrics.jsonl (or the run's log)
    fails; one paragraph, exit 74, and the records already written stay."""
    runs = small_tmpfs("8M")
    log, run_dir = tmp_path / "train.log", runs / "run"
    proc = start(args(sft_model, runs, tmp_path / "traces", 200, "checkpoints.save_every=200"), log)
    wait_for(lambda: len(logged_steps(run_dir)) >= 2 if (run_dir / metrics.METRICS).exists() else False)
    fill(runs)
    before = logged_steps(run_dir)
    assert proc.wait(timeout=300) == EXIT_STORAGE, log.read_text()[-3000:]
    assert_one_paragraph(log.read_text(), f"{run_dir}/", "the filesystem is full")
    assert set(before) <= set(logged_steps(run_dir))
    assert "cannot write the run's log" not in log.read_text().split("rlarith: storage error")[1]


def test_unwritable_folders_are_refused_before_the_model_loads(sft_model, small_tmpfs, ext4_image, tmp_path):
    """A read-only trace folder and a full run dir are found by a probe write before any model loads (they
    were found only at the first step, after it): exit 2, the key and the fix named."""
    disk = ext4_image("16M")
    disk.flip_read_only()
    out = cli(args(sft_model, tmp_path / "runs", disk.path / "traces", 4))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "traces.dir: cannot write to the trace folder" in out.stderr and "read-only" in out.stderr
    assert "Traceback" not in out.stderr and "starting from the model" not in out.stdout

    runs = small_tmpfs("1M")
    fill(runs)
    out = cli(args(sft_model, runs, tmp_path / "traces", 4))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "runs_dir/name: cannot write to the run directory" in out.stderr and "is full" in out.stderr
    assert "Traceback" not in out.stderr and "starting from the model" not in out.stdout


def test_a_node_crash_after_a_checkpoint_keeps_the_run_dirs_own_records(sft_model, ext4_image, tmp_path):
    """The node loses power after checkpoint-2 is sealed (nothing that was not fsynced reaches the disk).
    After the reboot config.yaml is whole, metrics.jsonl has every step the latest valid checkpoint covers
    (it was 0 bytes while the checkpoints verified), so the resume never starts past lost metrics; and the
    trainer, whose disk went away under it, ended with one paragraph."""
    disk = ext4_image("64M")
    log, run_dir = tmp_path / "train.log", disk.path / "run"
    proc = start(args(sft_model, disk.path, tmp_path / "traces", 40), log)
    wait_for(lambda: valid_checkpoints(run_dir), timeout=300)
    disk.crash()
    status = proc.wait(timeout=300)
    disk.remount()
    assert load_run_config(run_dir).name == "run"  # whole, not empty
    found = latest_verified(run_dir).checkpoint
    assert found is not None
    covered = int(found.name.split("-")[1])
    assert set(range(1, covered + 1)) <= set(logged_steps(run_dir)), (covered, logged_steps(run_dir))
    assert "starting from the model" in (run_dir / "logs" / "rank0.log").read_text()  # fsynced at the seal
    assert status == EXIT_STORAGE, log.read_text()[-3000:]
    assert_one_paragraph(log.read_text(), f"{disk.path}/", "an I/O error")
