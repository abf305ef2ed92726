"""GRPO training for real (TRL on the tiny model): bad input, the checkpoint policy, stop-and-resume exactness.

Every interrupted run is compared with an uninterrupted one: the metrics of every step after the resume
point and the final weights must be bitwise identical.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from conftest import REPO, assert_traces_recompute, cli, rlarith_env, run, start, wait_for
from rlarith.checkpoints import valid_checkpoints
from rlarith.preemption import EXIT_STOPPED

STEPS = 8
# Volatile by nature: wall-clock time and throughput.
VOLATILE = (
    "time",
    "step_time",
    "traces/write_s",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
)


def small(model: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "default.yaml"),
        f"name={name}", f"runs_dir={runs}", f"model.path={model}",
        f"training.max_steps={STEPS}", "training.prompts_per_step=4", "training.num_generations=4",
        "training.max_completion_length=5", "training.learning_rate=1e-3",
        "rewards.weights.exact=1", "rewards.weights.partial=1", "rewards.weights.format=0.5",
        "checkpoints.save_every=2", "checkpoints.reward_threshold=2.0", "checkpoints.save_on_best=false",
        "checkpoints.keep_best=false",
        "training.report_to=[]", *extra,
    ]  # fmt: skip


def metrics(run_dir: Path) -> dict[int, dict]:
    """Per step, the last logged metrics (a resumed run logs a step again when it re-runs it)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = {k: v for k, v in record.items() if k not in VOLATILE}
    return out


def assert_traces_match_metrics(run_dir: Path, world: int = 1) -> None:
    """Every step is in the traces once (default view), 16 completions of 4 problems on ``world`` ranks,
    each reward and advantage recomputed from the traced text, and the logged exact-match mean is that of
    the recomputed rewards."""
    frame = assert_traces_recompute(run_dir)
    logged = metrics(run_dir)
    assert sorted(frame["step"].unique()) == sorted(logged)
    for step, rows in frame.groupby("step"):
        assert rows["rank"].nunique() == world and rows["prompt"].str.contains("Compute").all()
        assert rows["reward/exact"].mean() == pytest.approx(logged[step]["rewards/exact/mean"], abs=1e-6)
        assert rows["reward_total"].mean() == pytest.approx(logged[step]["reward"], abs=1e-5)


def weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert (wa[key] == wb[key]).all(), f"{key} differs"


@pytest.fixture(scope="module")
def reference(sft_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of STEPS steps."""
    runs = tmp_path_factory.mktemp("ref")
    assert run(["train", *small(sft_model, runs, "ref")], runs / "log") == 0, (runs / "log").read_text()[
        -3000:
    ]
    return runs / "ref"


def test_uninterrupted_run_follows_the_policy(reference: Path) -> None:
    steps = [s for s, _ in valid_checkpoints(reference)]
    assert steps == [2, 6, 8]  # saves at 2, 4, 6, 8; after each: first, second-to-last, latest
    m = metrics(reference)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert any(m[s]["reward"] > 0 for s in m), "the warmed-up model must give GRPO some reward signal"
    assert any(m[s]["grad_norm"] > 0 for s in m)
    for line in (reference / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["time"].endswith("Z") and "T" in record["time"] and isinstance(record["step"], int)
    import re

    lines = (reference / "logs" / "rank0.log").read_text().splitlines()  # the run keeps its own log
    stamped = [
        line
        for line in lines
        if re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z step \d+ rank 0 \| ", line)
    ]
    assert len(stamped) >= STEPS and any(" step 8 rank 0 | " in line for line in stamped)
    log = (reference.parent / "log").read_text()
    assert "checkpoint-4 saved" in log and "removed" in log and "checkpoint-4" in log.split("removed", 1)[1]
    state = json.loads((reference / "checkpoints" / "checkpoint-8" / "rlarith_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [2, 4, 6, 8]
    assert_traces_match_metrics(reference)


def test_the_final_model_loads_with_from_pretrained(reference: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = reference / "checkpoints" / f"checkpoint-{STEPS}"
    AutoTokenizer.from_pretrained(checkpoint)
    assert AutoModelForCausalLM.from_pretrained(checkpoint).num_parameters() > 0


def test_same_seed_same_run(reference: Path, sft_model: Path, tmp_path: Path) -> None:
    args = small(sft_model, tmp_path, "again", "training.max_steps=2", "checkpoints.save_every=2")
    assert run(["train", *args], tmp_path / "log") == 0
    ref = metrics(reference)
    again = metrics(tmp_path / "again")
    for step in (1, 2):  # "epoch" is step / max_steps, and max_steps differs on purpose
        assert {k: v for k, v in again[step].items() if k != "epoch"} == {
            k: v for k, v in ref[step].items() if k != "epoch"
        }


def stop_and_resume(reference: Path, model: Path, runs: Path, sig: signal.Signals) -> int:
    """Signal a running train at step >= 2, check the stop path, resume, compare with the reference."""
    run_dir, log = runs / "cut", runs / "log"
    proc = start(["train", *small(model, runs, "cut")], log)
    wait_for(
        lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2 or proc.poll() is not None
    )
    proc.send_signal(sig)
    assert proc.wait(timeout=300) == EXIT_STOPPED, log.read_text()[-3000:]
    stopped_at = max(metrics(run_dir))
    assert stopped_at < STEPS, "the run ended before the signal landed"
    assert valid_checkpoints(run_dir)[-1][0] == stopped_at  # a full save at the step boundary
    assert f"received {sig.name}" in log.read_text()
    assert run(["train", *small(model, runs, "cut")], log) == 0, log.read_text()[-3000:]
    ref, cut = metrics(reference), metrics(run_dir)
    for step in range(stopped_at + 1, STEPS + 1):
        assert cut[step] == ref[step], f"step {step} differs after resume"
    assert_same_weights(
        run_dir / "checkpoints" / f"checkpoint-{STEPS}", reference / "checkpoints" / f"checkpoint-{STEPS}"
    )
    assert_traces_match_metrics(run_dir)
    import rlarith.traces

    attempts = rlarith.traces.open(run_dir).frame(all_attempts=True, columns=["step", "attempt"])
    assert attempts["attempt"].nunique() == 2  # both attempts are kept; the default view shows one per step
    # each attempt's shards record the step it resumed from: 0, then the stop's checkpoint
    assert sorted({s.resume_step for s in rlarith.traces.open(run_dir).sources}) == [0, stopped_at]
    return stopped_at


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_stops_at_a_step_boundary_and_resumes_exactly(reference, sft_model, tmp_path, sig) -> None:
    stop_and_resume(reference, sft_model, tmp_path, sig)


def test_sigkill_during_a_save_resumes_from_the_previous_valid_checkpoint(
    reference, sft_model, tmp_path
) -> None:
    run_dir, log = tmp_path / "killed", tmp_path / "log"
    args = ["train", *small(sft_model, tmp_path, "killed")]
    staging = run_dir / "checkpoints" / ".staging"
    proc = start(args, log)
    # Kill while the second save (step 4) is being written: checkpoint-2 is valid, 4 is in flight.
    wait_for(lambda: any(staging.glob("checkpoint-4")) or proc.poll() is not None, interval=0.002)
    proc.kill()
    proc.wait()
    valid = [s for s, _ in valid_checkpoints(run_dir)]
    assert valid and valid[-1] in (2, 4)
    for _, path in valid_checkpoints(run_dir):  # whatever is listed is complete and loadable
        weights(path)
    assert run(args, log) == 0, log.read_text()[-3000:]
    assert not any(staging.glob("checkpoint-*")), "leftovers of the killed save are cleaned"
    assert_same_weights(
        run_dir / "checkpoints" / f"checkpoint-{STEPS}", reference / "checkpoints" / f"checkpoint-{STEPS}"
    )


def test_overlapped_and_synchronous_saves_write_the_same_checkpoints(reference, sft_model, tmp_path) -> None:
    """The reference run saves in the background (the default); this one blocks at every save."""
    import torch

    assert (
        run(["train", *small(sft_model, tmp_path, "sync", "checkpoints.overlap=false")], tmp_path / "log")
        == 0
    )
    synced = tmp_path / "sync"
    assert metrics(synced) == metrics(reference)
    assert [s for s, _ in valid_checkpoints(synced)] == [s for s, _ in valid_checkpoints(reference)]
    for step, path in valid_checkpoints(reference):
        other = synced / "checkpoints" / path.name
        assert_same_weights(path, other)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            a, b = (torch.load(p / name, weights_only=False) for p in (path, other))
            assert same(a, b), f"checkpoint-{step}/{name} differs"
    assert "stall" in (reference.parent / "log").read_text() and "stall" not in (tmp_path / "log").read_text()


def same(a: object, b: object) -> bool:
    """Deep equality of loaded checkpoint files: tensors and arrays element for element."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def background_write_in_flight(run_dir: Path, proc: subprocess.Popen) -> None:
    """Wait until step 5 is logged while checkpoint-4 is still being written (RLARITH_TEST_WRITE_DELAY_S)."""
    staged = run_dir / "checkpoints" / ".staging" / "checkpoint-4"
    wait_for(
        lambda: (run_dir / "metrics.jsonl").exists() and 5 in metrics(run_dir) or proc.poll() is not None
    )
    assert proc.poll() is None and staged.is_dir(), (
        "the run must be training on while checkpoint-4 is written"
    )
    assert [s for s, _ in valid_checkpoints(run_dir)] == [2]


def test_sigkill_during_a_background_write_resumes_from_the_previous_checkpoint(
    reference, sft_model, tmp_path
) -> None:
    run_dir, log = tmp_path / "killed", tmp_path / "log"
    args = ["train", *small(sft_model, tmp_path, "killed")]
    proc = start(args, log, RLARITH_TEST_WRITE_DELAY_S="60")
    background_write_in_flight(run_dir, proc)
    proc.kill()
    proc.wait()
    assert [s for s, _ in valid_checkpoints(run_dir)] == [2], "an unsealed write is never a checkpoint"
    assert run(args, log) == 0, log.read_text()[-3000:]
    assert "resuming from" in log.read_text() and "checkpoint-2" in log.read_text().split("resuming from")[-1]
    ref, resumed = metrics(reference), metrics(run_dir)
    assert all(resumed[step] == ref[step] for step in range(3, STEPS + 1))
    assert_same_weights(
        run_dir / "checkpoints" / f"checkpoint-{STEPS}", reference / "checkpoints" / f"checkpoint-{STEPS}"
    )


def test_a_stop_during_a_background_write_waits_for_it_then_saves_and_resumes_exactly(
    reference, sft_model, tmp_path
) -> None:
    run_dir, log = tmp_path / "cut", tmp_path / "log"
    args = ["train", *small(sft_model, tmp_path, "cut")]
    proc = start(args, log, RLARITH_TEST_WRITE_DELAY_S="5")
    background_write_in_flight(run_dir, proc)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=300) == EXIT_STOPPED, log.read_text()[-3000:]
    stopped_at = max(metrics(run_dir))
    assert 4 < stopped_at < STEPS
    assert [s for s, _ in valid_checkpoints(run_dir)][-2:] == [4, stopped_at], (
        "4 sealed, then the stop's save"
    )
    assert f"the save of step {stopped_at} waited" in log.read_text()
    assert run(args, log) == 0, log.read_text()[-3000:]
    ref, cut = metrics(reference), metrics(run_dir)
    assert all(cut[step] == ref[step] for step in range(stopped_at + 1, STEPS + 1))
    assert_same_weights(
        run_dir / "checkpoints" / f"checkpoint-{STEPS}", reference / "checkpoints" / f"checkpoint-{STEPS}"
    )


def test_a_different_config_is_refused_unless_forced(reference, sft_model, tmp_path) -> None:
    args = small(sft_model, tmp_path, "ref", "training.learning_rate=5e-4")
    # Point at the reference run's parent so the run dir already exists with another config.
    args = [a.replace(f"runs_dir={tmp_path}", f"runs_dir={reference.parent}") for a in args]
    proc = cli(["train", *args])
    assert (
        proc.returncode == 2
        and "training.learning_rate: 0.001 -> 0.0005" in proc.stderr
        and "--force" in proc.stderr
    )
    # Forced (on a copy: other tests read the reference): it resumes, and the old config is kept beside the new.
    shutil.copytree(reference, tmp_path / "ref")
    forced = cli(
        ["train", "--force", *small(sft_model, tmp_path, "ref", "training.learning_rate=5e-4")], timeout=300
    )
    assert forced.returncode == 0, forced.stdout[-2000:] + forced.stderr[-2000:]
    assert "resuming from" in forced.stdout
    kept = list((tmp_path / "ref").glob("config.*.yaml"))
    assert len(kept) == 1 and "learning_rate: 0.001" in kept[0].read_text()
    assert "learning_rate: 0.0005" in (tmp_path / "ref" / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.path={tmp}/nothing"], "model.path: '{tmp}/nothing' is not a model directory"),
        (["runs_dir={tmp}/file/runs"], "cannot write to the run directory"),
        (["rewards.weights.exakt=1"], "rewards.weights.exakt: no such reward"),
        (
            ["training.steps_per_generation=2", "checkpoints.save_every=3"],
            "checkpoints.save_every: must be a multiple",
        ),
        (["data.strategy=fresh", "training.prompts_per_step=1000"], "data.strategy: 'fresh' needs 8,000"),
    ],
)
def test_bad_input_is_refused_before_any_compute(sft_model, tmp_path, overrides, message) -> None:
    (tmp_path / "file").write_text("not a directory")
    args = small(sft_model, tmp_path, "bad", *(o.format(tmp=tmp_path) for o in overrides))
    proc = cli(["train", *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(tmp=tmp_path) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------
# Two ranks under DeepSpeed ZeRO-2 (gloo on CPU), started the way SLURM starts tasks: one process per rank.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str], log_dir: Path, world: int = 2) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            DS_ACCELERATOR="cpu",
        )
        procs.append(start(args, log_dir / f"rank{rank}.log", **env))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_ranks_deepspeed_stop_on_one_rank_and_resume_exactly(sft_model, tmp_path, stage) -> None:
    common = [f"training.deepspeed={stage}"]
    # The reference runs under torchrun (the README's launch); the interrupted run as SLURM tasks would.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "rlarith.cli", "train", *small(sft_model, tmp_path, "ref2", *common)]  # fmt: skip
    ref = subprocess.run(torchrun, cwd=REPO, env=rlarith_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    run_dir = tmp_path / "cut2"
    args = ["train", *small(sft_model, tmp_path, "cut2", *common)]
    procs = start_ranks(args, tmp_path)
    wait_for(
        lambda: (
            (run_dir / "metrics.jsonl").exists()
            and len(metrics(run_dir)) >= 2
            or any(p.poll() is not None for p in procs)
        ),
        timeout=900,
    )
    os.kill(procs[random.Random(0).randrange(2)].pid, signal.SIGUSR2)  # one rank only: they must agree
    assert [p.wait(timeout=300) for p in procs] == [EXIT_STOPPED, EXIT_STOPPED], (
        tmp_path / "rank0.log"
    ).read_text()[-3000:]
    stopped_at = max(metrics(run_dir))
    assert stopped_at < STEPS and valid_checkpoints(run_dir)[-1][0] == stopped_at
    assert any((valid_checkpoints(run_dir)[-1][1]).glob("global_step*")), (
        "DeepSpeed shards are in the checkpoint"
    )

    resumed = start_ranks(args, tmp_path)
    assert [p.wait(timeout=900) for p in resumed] == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    ref_m, cut_m = metrics(tmp_path / "ref2"), metrics(run_dir)
    for step in range(stopped_at + 1, STEPS + 1):
        assert cut_m[step] == ref_m[step], f"step {step} differs after resume"
    assert_same_weights(
        run_dir / "checkpoints" / f"checkpoint-{STEPS}",
        tmp_path / "ref2" / "checkpoints" / f"checkpoint-{STEPS}",
    )
    assert_traces_match_metrics(run_dir, world=2)


# ---------------------------------------------------------------------------------------------------------
# The run directory is the source of truth: one writer, verified checkpoints, honest records (issue 12).


def logged_steps(run_dir: Path) -> list[int]:
    """The step of every loss record in metrics.jsonl itself, in file order (not deduplicated)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_a_second_start_on_a_running_run_is_refused_and_the_first_is_unharmed(reference, sft_model, tmp_path):
    run_dir, log = tmp_path / "busy", tmp_path / "log"
    args = ["train", *small(sft_model, tmp_path, "busy")]
    first = start(args, log)
    lock = run_dir / ".lock"
    wait_for(lambda: lock.exists() and f'"pid": {first.pid}' in lock.read_text() or first.poll() is not None)
    first.send_signal(signal.SIGSTOP)  # frozen while the second tries: the test does not race the first
    try:
        second = cli(args)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"is in use by pid {first.pid} on " in second.stderr and "Traceback" not in second.stderr
    assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert_same_weights(
        run_dir / "checkpoints" / f"checkpoint-{STEPS}", reference / "checkpoints" / f"checkpoint-{STEPS}"
    )
    assert_traces_match_metrics(run_dir)


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _zero_mib(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(2**20)
        f.write(bytes(2**20))


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage",
    [
        {8: ("model.safetensors", _truncate, "truncated"), 6: ("model.safetensors", _zero_mib, "checksum")},
        {8: ("rng_state.pth", Path.unlink, "missing"), 6: ("optimizer.pt", _truncate, "truncated")},
    ],
    ids=["truncated-and-zeroed-model", "deleted-rng-and-truncated-optimizer"],
)
def test_damaged_checkpoints_are_moved_aside_and_the_run_resumes_exactly(
    reference, sft_model, tmp_path, damage
):
    run_dir, log = tmp_path / "ref", tmp_path / "log"
    shutil.copytree(reference, run_dir)
    for step, (name, spoil, _) in damage.items():
        spoil(run_dir / "checkpoints" / f"checkpoint-{step}" / name)
    check = cli(["checkpoints", "verify", str(run_dir)])
    assert check.returncode == 1 and "1 ok, 2 damaged" in check.stdout, check.stdout

    assert run(["train", *small(sft_model, tmp_path, "ref")], log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    for step, (name, _, reason) in damage.items():
        [line] = [ln for ln in text.splitlines() if f"checkpoint-{step} is damaged" in ln]
        assert f"{name}: {reason}" in line and "moved aside to" in line
        [kept] = (run_dir / "checkpoints").glob(f".bad-{step}-*")  # evidence, not deleted
        assert (kept / "COMPLETE").is_file()
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-2'}" in text
    assert_same_weights(
        run_dir / "checkpoints" / f"checkpoint-{STEPS}", reference / "checkpoints" / f"checkpoint-{STEPS}"
    )
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # steps 3..8 re-run, each logged once
    assert metrics(run_dir) == metrics(reference)
    assert_traces_match_metrics(run_dir)
    assert cli(["checkpoints", "verify", str(run_dir)]).returncode == 0


def test_a_forced_learning_rate_change_takes_effect(reference, sft_model, tmp_path):
    run_dir = tmp_path / "ref"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"checkpoint-{STEPS}")  # resume from 6: steps 7, 8 to train
    args = small(sft_model, tmp_path, "ref", "training.learning_rate=5e-4")
    forced = cli(["train", "--force", *args], timeout=600)
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    assert "forced change applied: learning rate 0.001 -> 0.0005" in forced.stdout
    lr = {step: m["learning_rate"] for step, m in metrics(run_dir).items()}
    assert lr[6] == 1e-3 and lr[7] == lr[8] == 5e-4  # what is logged is what was applied
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "rlarith_state.json").read_text())
    assert state["config"]["training.learning_rate"] == 5e-4
    [entry] = [json.loads(line) for line in (run_dir / "forced.jsonl").read_text().splitlines()]
    assert entry["changes"] == {"training.learning_rate": [0.001, 0.0005]} and entry["to"] == state["run_id"]


def test_a_deleted_config_yaml_does_not_hide_a_different_config(reference, sft_model, tmp_path):
    run_dir = tmp_path / "ref"
    shutil.copytree(reference, run_dir)
    (run_dir / "config.yaml").unlink()
    proc = cli(["train", *small(sft_model, tmp_path, "ref", "training.learning_rate=5e-4")])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training.learning_rate: 0.001 -> 0.0005" in proc.stderr and "checkpoint-8 (run id" in proc.stderr
    assert "--force" in proc.stderr and not (run_dir / "config.yaml").exists()
    # A change that cannot take effect on a resumed run is refused even when forced.
    proc = cli(["train", "--force", *small(sft_model, tmp_path, "ref", "training.seed=1")])
    assert proc.returncode == 2 and "training.seed: cannot change when resuming" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("delay", [0.0, 0.5, 2.0])
def test_sigterm_right_after_start_stops_never_kills(sft_model, tmp_path, delay) -> None:
    import time

    from rlarith.preemption import block_stop_signals

    log = tmp_path / "log"
    with log.open("ab") as fh:  # started as a launcher should: stop signals blocked until handled
        proc = subprocess.Popen([sys.executable, "-m", "rlarith.cli", "train", *small(sft_model, tmp_path, "early")],
                                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=rlarith_env(),
                                preexec_fn=block_stop_signals)  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_STOPPED, log.read_text()[-3000:]
    assert "received SIGTERM" in log.read_text() and "Traceback" not in log.read_text()


def test_ctrl_c_once_saves_and_resumes_exactly(reference, sft_model, tmp_path) -> None:
    stop_and_resume(reference, sft_model, tmp_path, signal.SIGINT)
    assert "press Ctrl-C again to abort without saving" in (tmp_path / "log").read_text()
    assert logged_steps(tmp_path / "cut") == list(range(1, STEPS + 1))  # one record per step after resume


def test_ctrl_c_twice_aborts_without_saving(sft_model, tmp_path) -> None:
    run_dir, log = tmp_path / "abort", tmp_path / "log"
    # synchronous saves: a background write in flight at the second Ctrl-C may or may not get sealed
    proc = start(["train", *small(sft_model, tmp_path, "abort", "checkpoints.overlap=false")], log)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 1 or proc.poll() is not None,
             interval=0.001)  # fmt: skip
    proc.send_signal(signal.SIGINT)  # early in a step: the save waits for its end
    wait_for(lambda: "press Ctrl-C again" in log.read_text() or proc.poll() is not None, interval=0.001)
    saved = [s for s, _ in valid_checkpoints(run_dir)]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    assert "aborted by a second Ctrl-C" in log.read_text()
    assert [s for s, _ in valid_checkpoints(run_dir)] == saved


def test_sigterm_during_the_final_step_means_finished(reference, sft_model, tmp_path) -> None:
    run_dir, log = tmp_path / "last", tmp_path / "log"
    proc = start(["train", *small(sft_model, tmp_path, "last")], log)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and STEPS - 1 in metrics(run_dir) or proc.poll() is not None,
             interval=0.001)  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "received SIGTERM" in log.read_text() and "training is finished, so exit 0" in log.read_text()
    assert_same_weights(
        run_dir / "checkpoints" / f"checkpoint-{STEPS}", reference / "checkpoints" / f"checkpoint-{STEPS}"
    )
