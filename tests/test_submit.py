"""``rlarith submit`` for real: submitit's LocalExecutor, and a one-node SLURM with accounting and
partition-priority preemption (tests/slurm_cluster.py starts it; slurm/testcluster.sh is the cluster).

Every interrupted job is compared with an uninterrupted ``rlarith train`` of the same config and thread
count: every logged metric and the final weights must be bitwise identical, and the traces must hold each
step once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import assert_same_weights, metrics

from conftest import REPO, rlarith_env, run, wait_for
from rlarith import attempts
from rlarith.checkpoints import valid_checkpoints

STEPS = 30


def job_args(model: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """A small run (one step is ~0.2 s on the tiny model) that a test can interrupt in the middle."""
    return [
        "--config", str(REPO / "configs" / "default.yaml"),
        f"name={name}", f"runs_dir={runs}", f"model.path={model}",
        f"training.max_steps={STEPS}", "training.prompts_per_step=4", "training.num_generations=4",
        "training.max_completion_length=5", "training.learning_rate=1e-3", "training.report_to=[]",
        "rewards.weights.partial=1", "rewards.weights.format=0.5",  # a dense reward: real updates to compare
        "checkpoints.save_every=2", "checkpoints.reward_threshold=2.0", "checkpoints.save_on_best=false",
        "slurm.executor=slurm", "slurm.partition=low", "slurm.cpus_per_task=1", "slurm.mem_gb=1",
        "slurm.timeout_min=10", "slurm.signal_delay_s=30", f"slurm.logs_dir={runs / 'submitit'}",
        *extra,
    ]  # fmt: skip


def submit(
    args: list[str], env: dict[str, str], *flags: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlarith.cli", "submit", *flags, *args],
        cwd=REPO, capture_output=True, text=True, env=rlarith_env(**env), timeout=timeout,
    )  # fmt: skip


def job_id(output: str) -> str:
    match = re.search(r"submitted job (\S+)", output)
    assert match, output
    return match.group(1)


def follow(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``rlarith submit --wait`` in the background, its output to ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "rlarith.cli", "submit", "--wait", *args],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=rlarith_env(**env),
    )  # fmt: skip


def sacct(job: str, env: dict[str, str]) -> dict[str, str]:
    """The job's final state and exit code, and how many times it was restarted (one row per attempt)."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-D", "-j", job, "-o", "State,ExitCode"],
        capture_output=True, text=True, env={**os.environ, **env}, check=True,
    ).stdout.strip().splitlines()  # fmt: skip
    state, exit_code = (out[-1] if out else "UNKNOWN|").split("|")
    return {
        "state": state.split()[0] if state else "UNKNOWN",
        "restarts": str(len(out) - 1),
        "exit": exit_code,
    }


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


def preempt(env: dict[str, str], seconds: int = 4) -> str:
    """A job in the high partition that needs every node: SLURM preempts whatever runs in ``low``."""
    nodes = env["RLARITH_SLURM_NODES"].split(",")
    out = subprocess.run(
        ["sbatch", "-p", "high", "-N", str(len(nodes)), "--exclusive", "--mem=1G", "-o", "/dev/null",
         "--wrap", f"sleep {seconds}"],
        capture_output=True, text=True, env={**os.environ, **env}, check=True,
    ).stdout  # fmt: skip
    return out.split()[-1]


def assert_matches_reference(run_dir: Path, reference: Path) -> None:
    assert metrics(run_dir) == metrics(reference)
    assert_same_weights(valid_checkpoints(run_dir)[-1][1], valid_checkpoints(reference)[-1][1])
    import rlarith.traces

    frame = rlarith.traces.open(run_dir).frame()
    assert sorted(frame["step"].unique()) == list(range(1, STEPS + 1))
    assert (frame.groupby("step").size() == 16).all()  # each step once: 4 problems x 4 completions


def ended(run_dir: Path) -> list[str]:
    return [row.get("ended", "") for row in attempts.merged(run_dir)]


@pytest.fixture(scope="module")
def reference(sft_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, with plain ``rlarith train`` (one thread, as in the jobs)."""
    runs = tmp_path_factory.mktemp("submit-ref")
    args = [a for a in job_args(sft_model, runs, "ref") if not a.startswith("slurm.")]
    assert run(["train", *args], runs / "log") == 0, (runs / "log").read_text()[-3000:]
    assert any(m["grad_norm"] > 0 for m in metrics(runs / "ref").values()), "the weights must move"
    return runs / "ref"


# ------------------------------------------------------------------------------------------ no SLURM


def test_dry_run_prints_the_batch_script_and_submits_nothing(sft_model: Path, tmp_path: Path) -> None:
    args = job_args(sft_model, tmp_path, "dry", "slurm.gpus_per_node=2", "slurm.tasks_per_node=2")
    out = submit(args, {}, "--dry-run")
    assert out.returncode == 0, out.stderr
    for line in ("#SBATCH --partition=low", "#SBATCH --requeue", "#SBATCH --signal=USR2@30",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --time=10", "#SBATCH --mem=1GB", "submitit.core._submit"):  # fmt: skip
        assert line in out.stdout, line
    # srun restates the CPUs per rank (SLURM 22.05-23.02's srun does not inherit sbatch's).
    (srun,) = [line for line in out.stdout.splitlines() if line.startswith("srun ")]
    assert "--cpus-per-task=1" in srun.split(), srun
    assert not (tmp_path / "submitit").exists() and not (tmp_path / "dry").exists()


def test_local_executor_runs_the_job_and_records_the_attempt(sft_model: Path, tmp_path: Path) -> None:
    args = job_args(sft_model, tmp_path, "local", "slurm.executor=local", "training.max_steps=4")
    out = submit(args, {}, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "training finished" in out.stdout
    rows = attempts.merged(tmp_path / "local")
    assert len(rows) == 1 and rows[0]["ended"] == "finished" and rows[0]["first_step"] == 1
    assert rows[0]["last_step"] == 4 and rows[0]["checkpoint"] == 4 and rows[0]["exit"] == 0
    status = subprocess.run(
        [sys.executable, "-m", "rlarith.cli", "status", str(tmp_path / "local")],
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and "finished" in status.stdout and "checkpoint-4" in status.stdout
    # One attempt id for the job driver's record and the trainer's traces.
    import rlarith.traces

    assert set(rlarith.traces.open(tmp_path / "local").frame()["attempt"]) == {rows[0]["attempt"]}


def test_a_missing_model_is_refused_before_submitting(tmp_path: Path) -> None:
    out = submit(job_args(tmp_path / "nope", tmp_path, "x", "slurm.executor=local"), {})
    assert out.returncode == 2 and "model.path" in out.stderr and not (tmp_path / "submitit").exists()


# ------------------------------------------------------------------------------------------ SLURM


@pytest.mark.slow
def test_job_finishes_and_its_script_is_the_dry_run(slurm_cluster, sft_model: Path, tmp_path: Path, reference: Path) -> None:  # fmt: skip
    env = slurm_cluster.env
    args = job_args(sft_model, tmp_path, "plain")
    out = submit(args, env, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    job = job_id(out.stdout)
    assert sacct(job, env)["state"] == "COMPLETED"
    assert ended(tmp_path / "plain") == ["finished"]
    assert_matches_reference(tmp_path / "plain", reference)
    # The golden check: what was submitted is what --dry-run prints.
    dry = submit(args, env, "--dry-run").stdout
    script = (tmp_path / "submitit" / "plain" / f"{job}_submission.sh").read_text()
    assert script.strip() in dry


@pytest.mark.slow
def test_preempted_job_saves_requeues_and_resumes_exactly(slurm_cluster, sft_model: Path, tmp_path: Path, reference: Path) -> None:  # fmt: skip
    env, run_dir = slurm_cluster.env, tmp_path / "pre"
    watcher = follow(job_args(sft_model, tmp_path, "pre"), env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 3 or watcher.poll() is not None, timeout=180)
    preempt(env)
    assert watcher.wait(timeout=400) == 0, (tmp_path / "wait.log").read_text()
    said = (tmp_path / "wait.log").read_text()
    job = job_id(said)
    assert f"attempt {job}.0 started" in said and f"attempt {job}.1 started" in said, said
    assert ended(run_dir) == ["preempted", "finished"]
    rows = attempts.merged(run_dir)
    assert rows[1]["first_step"] == rows[0]["checkpoint"] + 1  # resumed from what the first attempt saved
    assert sacct(job, env) == {"state": "COMPLETED", "restarts": "1", "exit": "0:0"}
    assert_matches_reference(run_dir, reference)


@pytest.mark.slow
def test_time_limit_requeues_until_max_timeouts_then_stops_clearly(slurm_cluster, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    env, run_dir = slurm_cluster.env, tmp_path / "limit"
    # 1 minute per attempt, USR2 5 s before the end (SLURM may send it up to a minute early): never done.
    args = job_args(sft_model, tmp_path, "limit", "training.max_steps=2000", "checkpoints.save_every=1000",
                    "slurm.timeout_min=1", "slurm.signal_delay_s=5", "slurm.max_timeouts=1",
                    "traces.enabled=false")  # fmt: skip
    out = submit(args, env, "--wait", timeout=400)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "slurm.max_timeouts=1" in out.stdout and "resumes exactly" in out.stdout, out.stdout
    assert ended(run_dir) == ["timeout", "timeout-limit"]
    assert sacct(job_id(out.stdout), env)["restarts"] == "1"
    rows = attempts.merged(run_dir)
    assert rows[1]["first_step"] == (rows[0].get("checkpoint") or 0) + 1  # resumed from what was saved


@pytest.mark.slow
def test_failing_trainer_fails_the_job_once(slurm_cluster, tmp_path: Path) -> None:
    env, model = slurm_cluster.env, tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    out = submit(job_args(model, tmp_path, "broken"), env, "--wait", timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    job = job_id(out.stdout)
    time.sleep(3)  # a requeue, were there one, would show by now
    assert sacct(job, env)["state"] == "FAILED" and sacct(job, env)["restarts"] == "0"
    assert ended(tmp_path / "broken") == ["failed"]
    assert "exited with status" in out.stdout


def trainers_seen(run_dir: Path) -> list[dict[str, str]]:
    """For each running trainer of ``run_dir``: its executable, the folder mounted as its root (from
    /proc/PID/mountinfo; ``/`` on the host) and its environment."""
    seen = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\x00")
            if b"train" not in cmdline or not any(str(run_dir.parent).encode() in arg for arg in cmdline):
                continue
            root = [
                line.split()[3]
                for line in (proc / "mountinfo").read_text().splitlines()
                if line.split()[4] == "/"
            ]
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\x00") if "=" in v)
            seen.append({"exe": os.readlink(proc / "exe"), "root": root[-1], "env": env})
        except (OSError, IndexError):
            continue
    return seen


@pytest.mark.image
@pytest.mark.slow
def test_container_job_gets_signals_and_is_requeued_from_the_host(slurm_cluster, image, sft_model: Path, tmp_path: Path, reference: Path) -> None:  # fmt: skip
    """The trainer in the real image under ch-run (apptainer's model: a read-only image directory, the
    host user, binds; no scontrol inside): preempted, saved inside, requeued from the host, resumed."""
    env, run_dir = slurm_cluster.env, tmp_path / "box"
    # The environment is clean: a host PYTHONPATH would put this sitecustomize into the image's Python.
    leak = tmp_path / "leak"
    leak.mkdir()
    (leak / "sitecustomize.py").write_text(
        "import sys, pathlib\n"
        f"if sys.prefix.startswith('/opt/conda'): pathlib.Path({str(tmp_path / 'leaked')!r}).touch()\n"
    )
    env = {**env, "PYTHONPATH": str(leak)}
    traces = tmp_path / "not-yet" / "traces"  # a bind source that does not exist when the job starts
    args = job_args(sft_model, tmp_path, "box", f"slurm.container={image.ch_dir}", "slurm.container_runtime=ch-run",
                    f"traces.dir={traces}")  # fmt: skip
    watcher = follow(args, env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 3 or watcher.poll() is not None, timeout=300)
    (trainer,) = trainers_seen(tmp_path)
    preempt(env)
    assert watcher.wait(timeout=400) == 0, (tmp_path / "wait.log").read_text()
    # The trainer ran in the image (its Python, the image directory as its root) with a clean environment.
    assert trainer["root"] == str(image.ch_dir) and trainer["env"]["PATH"].startswith("/opt/conda/bin:"), (
        trainer
    )
    assert "PYTHONPATH" not in trainer["env"] and trainer["env"]["PYTHONNOUSERSITE"] == "1"
    assert trainer["env"]["RLARITH_ATTEMPT"] == attempts.merged(run_dir)[0]["attempt"]
    assert ended(run_dir) == ["preempted", "finished"]
    assert not (tmp_path / "leaked").exists(), "the host's PYTHONPATH reached the image's Python"
    assert_matches_reference(run_dir, reference)


@pytest.mark.slow
def test_two_tasks_deepspeed_preempted_and_resumed_exactly(slurm_cluster, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    env, run_dir = {**slurm_cluster.env, "DS_ACCELERATOR": "cpu"}, tmp_path / "two"
    extra = ("training.deepspeed=zero2", "training.max_steps=12", "slurm.tasks_per_node=2")
    # The reference: torchrun on this machine, the same two ranks without SLURM.
    ref_args = [a for a in job_args(sft_model, tmp_path, "ref2", *extra) if not a.startswith("slurm.")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29577",
                "-m", "rlarith.train", *ref_args]  # fmt: skip
    ref = subprocess.Popen(torchrun, cwd=REPO, env=rlarith_env(DS_ACCELERATOR="cpu"), stdout=subprocess.DEVNULL,
                           stderr=(tmp_path / "ref.log").open("w"))  # fmt: skip
    watcher = follow(job_args(sft_model, tmp_path, "two", *extra), env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 2 or watcher.poll() is not None, timeout=400)
    preempt(env)
    assert watcher.wait(timeout=600) == 0, (tmp_path / "wait.log").read_text()
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert ended(run_dir) == ["preempted", "finished"]
    assert metrics(run_dir) == metrics(tmp_path / "ref2")
    last, ref_last = valid_checkpoints(run_dir)[-1][1], valid_checkpoints(tmp_path / "ref2")[-1][1]
    assert any(last.glob("global_step*")), "DeepSpeed shards are in the checkpoint"
    assert_same_weights(last, ref_last)


@pytest.mark.slow
def test_killed_during_a_save_resumes_from_the_previous_valid_checkpoint(slurm_cluster, sft_model: Path, tmp_path: Path, reference: Path) -> None:  # fmt: skip
    """A node dies mid-save (SIGKILL to the trainer while SLURM requeues the job): the half-written
    checkpoint is never used; the job restarts from the previous valid one and ends bitwise equal."""
    env, run_dir = slurm_cluster.env, tmp_path / "kill"
    watcher = follow(
        job_args(sft_model, tmp_path, "kill", "checkpoints.save_every=1"), env, tmp_path / "wait.log"
    )
    staging = run_dir / "checkpoints" / ".staging"
    saving = lambda: logged_step(run_dir) >= 3 and any(staging.glob("checkpoint-*/*"))  # noqa: E731
    wait_for(lambda: saving() or watcher.poll() is not None, timeout=180, interval=0.005)
    job = job_id((tmp_path / "wait.log").read_text())
    # The node dies: SLURM requeues the job and every process of it is gone at once, driver included.
    subprocess.run(["scontrol", "requeue", job], env={**os.environ, **env}, check=True)
    pattern = f"(submitit.core._submit|rlarith.cli train).*{tmp_path.name}"
    subprocess.run(["pkill", "-KILL", "-f", pattern], check=False)
    assert watcher.wait(timeout=400) == 0, (tmp_path / "wait.log").read_text()
    rows = attempts.merged(run_dir)
    assert len(rows) == 2 and rows[0]["ended"] == "lost" and rows[1]["ended"] == "finished"  # recorded by 1
    assert rows[1]["first_step"] <= logged_step(run_dir)
    assert_matches_reference(run_dir, reference)


def test_trainer_warns_when_a_step_and_a_save_do_not_fit_the_signal_lead(
    sft_model: Path, tmp_path: Path
) -> None:
    args = [
        a
        for a in job_args(sft_model, tmp_path, "tight", "training.max_steps=2")
        if not a.startswith("slurm.")
    ]
    assert run(["train", *args, "slurm.signal_delay_s=0"], tmp_path / "log") == 0
    (line,) = [x for x in (tmp_path / "log").read_text().splitlines() if "grace budget" in x]
    assert "FAIL" in line and "of 0 s (slurm.signal_delay_s)" in line and "raise slurm.signal_delay_s" in line


@pytest.mark.slow
def test_plain_sbatch_template_is_preempted_and_resumes(slurm_cluster, sft_model: Path, tmp_path: Path, reference: Path) -> None:  # fmt: skip
    """slurm/rlarith.sbatch, for users without submitit: the same stop, requeue and exact resume."""
    env, run_dir = slurm_cluster.env, tmp_path / "plain-sbatch"
    args = [a for a in job_args(sft_model, tmp_path, "plain-sbatch") if not a.startswith("slurm.")]
    resolved = subprocess.run(
        [sys.executable, "-m", "rlarith.cli", "config", *args], capture_output=True, text=True
    )
    (tmp_path / "run.yaml").write_text(resolved.stdout)
    job = slurm_cluster.sbatch([
        "-p", "low", "-c", "1", "--mem=1G", "--gpus-per-node=0", "--signal=USR2@30", "-D", str(REPO),
        "-o", str(tmp_path / "job.out"), "--export", f"ALL,CONFIG={tmp_path / 'run.yaml'},OMP_NUM_THREADS=1,"
        f"PATH={Path(sys.executable).parent}:{os.environ['PATH']}", str(REPO / "slurm" / "rlarith.sbatch"),
    ])  # fmt: skip
    wait_for(
        lambda: logged_step(run_dir) >= 3 or slurm_cluster.job_state(job) in ("FAILED", "COMPLETED"),
        timeout=180,
    )
    preempt(env)
    slurm_cluster.wait_state(job, ["COMPLETED", "FAILED", "CANCELLED"], timeout=400)
    states = slurm_cluster.job_states(job)
    # The script requeues itself on exit 75 (REQUEUED) unless SLURM's grace ran out first (PREEMPTED).
    assert states in (["REQUEUED", "COMPLETED"], ["PREEMPTED", "COMPLETED"]), (
        tmp_path / "job.out"
    ).read_text()[-3000:]
    assert_matches_reference(run_dir, reference)
