"""Every way a cluster job ends, on the real test cluster with real signals and real processes: a cancel is
a stop, a failed rank ends the job in seconds with its own error, a lost attempt restarts within
``slurm.max_failures``, a stale run lock of the job's earlier attempt is waited for, and a signal during
the driver's start-up is honoured. Each records a line in attempts.jsonl and a sentence in ``status``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_submit import (  # noqa: F401  (reference: the uninterrupted run, a fixture)
    assert_matches_reference,
    ended,
    follow,
    job_args,
    job_id,
    logged_step,
    reference,  # noqa: F811
    sacct,
)
from test_train import assert_same_weights, metrics

from conftest import REPO, rlarith_env, wait_for
from rlarith import attempts
from rlarith.checkpoints import valid_checkpoints

TWO_RANKS = ("training.deepspeed=zero2", "slurm.tasks_per_node=2", "training.max_steps=200",
             "checkpoints.save_every=1000", "traces.enabled=false")  # fmt: skip
"""A 2-rank job (ZeRO-2 on CPU over gloo) that runs until the test ends it; no checkpoint but the stop's."""


@pytest.fixture(autouse=True)
def empty_queue(request: pytest.FixtureRequest):  # a failed test leaves no job behind to disturb the next
    yield
    if "slurm_cluster" in request.fixturenames:
        request.getfixturevalue("slurm_cluster").cancel_all()


def test_status_shows_the_latest_attempt_not_an_older_failure(tmp_path: Path) -> None:
    """A failure that was requeued and followed by a finished attempt is history: the table keeps it,
    "now:" says the run finished (before, the old traceback was shown as "the last failure said")."""
    from rlarith.status import report

    run = tmp_path / "run"
    for record in (
        attempts.Attempt("start", "7.0", "7", host="n1", first_step=1),
        attempts.Attempt("rank", "7.0", "7", host="n2", rank=1, exit=-9, detail="Killed"),
        attempts.Attempt("end", "7.0", "7", last_step=6, checkpoint=4, ended="failed-requeued", exit=1, rank=1,
                         reason="advanced to checkpoint-4", detail="rank 1 on n2: the trainer exited with status -9\n"
                         "RuntimeError: boom"),
        attempts.Attempt("start", "7.1", "7", host="n1", restart=1, first_step=5),
        attempts.Attempt("end", "7.1", "7", restart=1, last_step=8, checkpoint=8, ended="finished", exit=0),
    ):  # fmt: skip
        attempts.append(run, record)
    shown = report(run)
    assert "failed-requeued (rank 1, exit 1)" in shown and "now: attempt 7.1 ended: training reached" in shown
    assert "boom" not in shown and "to resume" not in shown, shown


def status(run_dir: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "rlarith.cli", "status", str(run_dir)], capture_output=True,
                         text=True, env=rlarith_env(), check=True)  # fmt: skip
    return out.stdout


def processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (the test's folder): drivers, trainers."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "-m pytest" not in cmdline:  # the test's own paths hold "pytest"
            found.append(f"{pid}: {cmdline}")
    return found


def drivers(marker: str) -> list[int]:
    """The job drivers (submitit's runner in each task; not the srun that starts it)."""
    return [int(line.split(":")[0]) for line in processes(marker)
            if "submitit.core._submit" in line and "python" in line.split()[1].rsplit("/", 1)[-1]]  # fmt: skip


def trainer_pid(marker: str, rank: int) -> int | None:
    """The pid of the trainer (``rlarith.cli train``) of ``rank`` in the test's job."""
    for line in processes(marker):
        pid, _, cmdline = line.partition(": ")
        if "rlarith.cli train" not in cmdline:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def lock_is_free(run_dir: Path) -> bool:
    with (run_dir / ".lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def scontrol(cluster, *args: str) -> None:
    subprocess.run(["scontrol", *args], env={**os.environ, **cluster.env}, check=True, capture_output=True)


@pytest.mark.slow
def test_scancel_saves_and_ends_cancelled_never_requeued(slurm_cluster, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    env, run_dir = {**slurm_cluster.env, "DS_ACCELERATOR": "cpu"}, tmp_path / "cancel"
    watcher = follow(job_args(sft_model, tmp_path, "cancel", *TWO_RANKS), env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 2 or watcher.poll() is not None, timeout=400)
    job = job_id((tmp_path / "wait.log").read_text())
    subprocess.run(["scancel", job], env={**os.environ, **env}, check=True)
    assert watcher.wait(timeout=120) == 1, (tmp_path / "wait.log").read_text()
    said = (tmp_path / "wait.log").read_text()
    assert "cancelled (scancel): saved, not requeued" in said and "rlarith submit -c" in said, said
    time.sleep(15)  # a requeue, were there one, would have restarted the job by now (cred_expire=10)
    assert sacct(job, env)["state"] == "CANCELLED" and sacct(job, env)["restarts"] == "0"
    assert ended(run_dir) == ["cancelled"]
    rows = attempts.merged(run_dir)
    assert rows[0]["checkpoint"] >= 2 and valid_checkpoints(run_dir)[-1][0] == rows[0]["checkpoint"]
    assert "cancelled (scancel); saved, not requeued" in status(run_dir)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_its_own_error(slurm_cluster, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    """kill -9 of rank 1's trainer: the job ends in seconds, its message is rank 1's (not rank 0's "connection
    reset by peer"), every process is gone and the run lock is free. No progress: not requeued."""
    env, run_dir = {**slurm_cluster.env, "DS_ACCELERATOR": "cpu"}, tmp_path / "rank"
    watcher = follow(job_args(sft_model, tmp_path, "rank", *TWO_RANKS), env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 2 or watcher.poll() is not None, timeout=400)
    pid = trainer_pid(tmp_path.name, rank=1)
    assert pid, processes(tmp_path.name)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert watcher.wait(timeout=120) == 1, (tmp_path / "wait.log").read_text()
    took = time.monotonic() - killed
    said = (tmp_path / "wait.log").read_text()
    assert "rank 1 on" in said and "status -9 (killed by SIGKILL)" in said, said
    assert "no progress since the start" in said, said
    job = job_id(said)
    slurm_cluster.wait_state(job, ["FAILED"], timeout=60)
    wait_for(lambda: not processes(tmp_path.name), timeout=30)
    assert lock_is_free(run_dir)
    assert ended(run_dir) == ["failed"] and sacct(job, env)["restarts"] == "0"
    row = attempts.merged(run_dir)[0]
    assert row["rank"] == 1 and "rank 1 on" in row["detail"]
    shown = status(run_dir)
    assert "now: attempt" in shown and "rank 1 on" in shown and "to resume" in shown, shown
    print(f"kill -9 of rank 1 -> --wait returned in {took:.1f} s")


@pytest.mark.slow
def test_a_lost_attempt_restarts_within_max_failures(slurm_cluster, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    """The node dies (SLURM requeues the job, every process of it SIGKILLed): the next attempt records the
    lost one, and with ``slurm.max_failures=0`` does not run it again."""
    env, run_dir = slurm_cluster.env, tmp_path / "lost"
    args = job_args(sft_model, tmp_path, "lost", "slurm.max_failures=0", "training.max_steps=200",
                    "checkpoints.save_every=1000", "traces.enabled=false")  # fmt: skip
    watcher = follow(args, env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 2 or watcher.poll() is not None, timeout=400)
    job = job_id((tmp_path / "wait.log").read_text())
    scontrol(slurm_cluster, "requeue", job)
    subprocess.run(["pkill", "-KILL", "-f", f"(submitit.core._submit|rlarith.cli train).*{tmp_path.name}"])
    assert watcher.wait(timeout=300) == 1, (tmp_path / "wait.log").read_text()
    said = (tmp_path / "wait.log").read_text()
    assert "was lost (node failure or SIGKILL)" in said and "slurm.max_failures=0" in said, said
    assert ended(run_dir) == ["lost", "failed"]
    assert sacct(job, env)["state"] == "FAILED"
    shown = status(run_dir)
    assert " lost" in shown and "slurm.max_failures=0" in shown and "to resume" in shown, shown


@pytest.mark.slow
def test_a_stale_lock_of_an_earlier_attempt_is_waited_for(slurm_cluster, sft_model: Path, tmp_path: Path, reference: Path) -> None:  # noqa: F811  # fmt: skip
    """After a real node crash a shared filesystem may keep the dead rank 0's lock granted for a while. Here
    a process takes over the killed attempt's lock (its note still names that attempt) and lets go 20 s
    after the restart began: the restart waits for it and the run ends bitwise equal."""
    env, run_dir = counting_sacct(slurm_cluster.env, tmp_path), tmp_path / "stale"
    watcher = follow(job_args(sft_model, tmp_path, "stale"), env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 3 or watcher.poll() is not None, timeout=400)
    job = job_id((tmp_path / "wait.log").read_text())
    scontrol(slurm_cluster, "requeue", job)
    subprocess.run(["pkill", "-KILL", "-f", f"(submitit.core._submit|rlarith.cli train).*{tmp_path.name}"])
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; fh = open(sys.argv[1], 'a'); fcntl.flock(fh, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(float(sys.argv[2]))"), str(run_dir / ".lock"), "600"],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    waiting = "held by an earlier attempt of this job"
    wait_for(lambda: len(attempts.merged(run_dir)) >= 2 or watcher.poll() is not None, timeout=120)
    time.sleep(4)  # the old code gave up after 1 s
    asked = len((tmp_path / "sacct.calls").read_text().splitlines())
    time.sleep(16)
    # Nothing changes meanwhile: --wait backs off (it asked sacct every 2 s, 8 times in these 16 s).
    quiet = len((tmp_path / "sacct.calls").read_text().splitlines()) - asked
    assert quiet <= 4, f"--wait asked sacct {quiet} times in 16 quiet seconds"
    holder.kill()
    holder.wait()
    assert watcher.wait(timeout=400) == 0, (tmp_path / "wait.log").read_text()
    assert ended(run_dir) == ["lost", "finished"]
    said = "".join(
        f.read_text(errors="replace") for f in (tmp_path / "submitit" / "stale").glob(f"{job}_0_log.*")
    )
    assert waiting in said and "the run lock was released after" in said, said[-3000:]
    assert_matches_reference(run_dir, reference)


def counting_sacct(env: dict[str, str], folder: Path) -> dict[str, str]:
    """``env`` with a ``sacct`` first on PATH that notes each call in ``folder/sacct.calls``, then runs
    the cluster's own."""
    import shutil

    path = env.get("PATH", os.environ["PATH"])
    real = shutil.which("sacct", path=path)
    assert real, "no sacct on the cluster's PATH"
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(f'#!/bin/sh\necho "$*" >> {folder / "sacct.calls"}\nexec {real} "$@"\n')
    (bin_dir / "sacct").chmod(0o755)
    (folder / "sacct.calls").touch()
    return {**env, "PATH": f"{bin_dir}:{path}"}


def asks(pid: int, *words: str) -> bool:
    """Whether process ``pid`` has a child whose command line holds every one of ``words``."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        lines = [Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode() for c in children]
    except OSError:
        return False
    return any(all(w in line for w in words) for line in lines)


def _ctld_pid(cluster) -> int:
    pidfile = Path(cluster.env.get("RLARITH_SLURM_DIR", "/tmp/rlarith-slurm")) / "run" / "slurmctld.pid"
    if pidfile.is_file():
        return int(pidfile.read_text().split()[0])
    return int(subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True).stdout.split()[0])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=["USR2", "TERM"])
def test_a_signal_during_the_drivers_start_up_is_honoured(slurm_cluster, sft_model: Path, tmp_path: Path, sig: signal.Signals) -> None:  # fmt: skip
    """The driver's start-up asks SLURM (scontrol) before it starts the trainer; with a slow controller
    (slurmctld stopped here) a signal then must still reach the trainer: it stops with a save and the job
    is requeued, and the next attempt finishes. Before, submitit's handler requeued from the signal
    handler without a record (USR2), or ignored the signal (TERM) and the trainer never stopped."""
    env, run_dir = slurm_cluster.env, tmp_path / "early"
    args = job_args(sft_model, tmp_path, "early", "training.max_steps=4", "traces.enabled=false")
    watcher = follow(args, env, tmp_path / "wait.log")
    marker = str(tmp_path / "submitit")
    wait_for(lambda: drivers(marker) or watcher.poll() is not None, timeout=120, interval=0.01)
    ctld = _ctld_pid(slurm_cluster)
    os.kill(ctld, signal.SIGSTOP)
    try:
        (driver,) = drivers(marker)

        wait_for(lambda: asks(driver, "scontrol"), timeout=30, interval=0.01)
        os.kill(driver, sig)
        time.sleep(0.5)
    finally:
        os.kill(ctld, signal.SIGCONT)
    assert watcher.wait(timeout=400) == 0, (tmp_path / "wait.log").read_text()
    rows = attempts.merged(run_dir)
    assert [r.get("ended") for r in rows] == ["requeued", "finished"], rows
    assert rows[0]["detail"] == f"signal {sig.name}" and rows[1]["first_step"] == 1


# ------------------------------------------------------------------------------- two nodes (n1, n2)

TWO_NODES = ("training.deepspeed=zero2", "slurm.nodes=2", "slurm.tasks_per_node=1", "training.max_steps=12",
             "training.collective_timeout_s=10", "traces.enabled=false")  # fmt: skip
"""Rank 0 on n1, rank 1 on n2 (ZeRO-2 on CPU over gloo); a vanished peer fails a collective in 10 s,
before SLURM declares its node dead (SlurmdTimeout=30)."""


def two_nodes(cluster) -> None:
    if len(getattr(cluster, "nodes", [])) < 2:
        pytest.skip("needs the two-node test cluster (slurm/testcluster.sh with n1 and n2)")


@pytest.fixture(scope="module")
def reference2(sft_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-rank run: torchrun on this machine, the same ranks without SLURM."""
    runs = tmp_path_factory.mktemp("endings-ref2")
    # No short collective timeout here: the reference has no peer to lose, and a slow moment on a loaded
    # machine once aborted it (SIGABRT in rank 0 at the end of training, seen once in 14 runs).
    args = [a for a in job_args(sft_model, runs, "ref2", *TWO_NODES)
            if not a.startswith(("slurm.", "training.collective_timeout_s"))]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581",
                "-m", "rlarith.train", *args]  # fmt: skip
    log = runs / "ref.log"
    done = subprocess.run(torchrun, cwd=REPO, env=rlarith_env(DS_ACCELERATOR="cpu"), stdout=subprocess.DEVNULL,
                          stderr=log.open("w"), timeout=900)  # fmt: skip
    assert done.returncode == 0, log.read_text()[-3000:]
    return runs / "ref2"


@pytest.mark.slow
def test_a_peer_whose_link_goes_down_ends_the_job_in_minutes(slurm_cluster, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    """n2's link goes down (no reset reaches n1): the ranks time out in their collective after
    training.collective_timeout_s instead of waiting for SLURM (or torch's 30 min); the job ends within
    2 minutes with a rank's own error, every process gone and the run lock free."""
    two_nodes(slurm_cluster)
    env, run_dir = {**slurm_cluster.env, "DS_ACCELERATOR": "cpu"}, tmp_path / "link"
    args = job_args(
        sft_model, tmp_path, "link", *TWO_NODES, "training.max_steps=200", "checkpoints.save_every=1000"
    )
    watcher = follow(args, env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 2 or watcher.poll() is not None, timeout=400)
    job = job_id((tmp_path / "wait.log").read_text())
    slurm_cluster.link_down("n2")
    cut = time.monotonic()
    try:
        assert watcher.wait(timeout=180) == 1, (tmp_path / "wait.log").read_text()
        took = time.monotonic() - cut
        said = (tmp_path / "wait.log").read_text()
        assert took < 120, f"--wait took {took:.0f} s after the link went down:\n{said}"
        assert "rank " in said and "the trainer exited with status" in said, said
        wait_for(lambda: not processes(tmp_path.name), timeout=60)
        assert lock_is_free(run_dir)
    finally:
        slurm_cluster.link_up("n2")
    rows = attempts.merged(run_dir)
    assert rows[0]["ended"] == "failed" and "no progress" in rows[0]["reason"], rows
    # Not requeued by SLURM either, when it declares n2 dead (NODE_FAIL would requeue a requeueable job).
    assert slurm_cluster.wait_state(job, ["FAILED", "NODE_FAIL"], timeout=120)
    time.sleep(5)
    assert slurm_cluster.job_states(job)[-1] in ("FAILED", "NODE_FAIL") and len(attempts.merged(run_dir)) == 1
    print(f"link down -> --wait returned in {took:.1f} s; job {job}: {slurm_cluster.job_states(job)}")


@pytest.mark.slow
def test_a_dead_node_with_progress_restarts_from_the_checkpoint_exactly(slurm_cluster, sft_model: Path, tmp_path: Path, reference2: Path) -> None:  # fmt: skip
    """n2 loses its power after a checkpoint: the job restarts (once n2 is back) from its latest
    checkpoint and ends bitwise equal to an uninterrupted run."""
    two_nodes(slurm_cluster)
    env, run_dir = {**slurm_cluster.env, "DS_ACCELERATOR": "cpu"}, tmp_path / "dead"
    watcher = follow(job_args(sft_model, tmp_path, "dead", *TWO_NODES), env, tmp_path / "wait.log")
    wait_for(lambda: (valid_checkpoints(run_dir) and valid_checkpoints(run_dir)[-1][0] >= 4)
             or watcher.poll() is not None, timeout=400)  # fmt: skip
    job = job_id((tmp_path / "wait.log").read_text())
    slurm_cluster.kill_node("n2")
    try:
        wait_for(lambda: slurm_cluster.job_state(job) in ("PENDING", "REQUEUED") or watcher.poll() is not None,
                 timeout=180, interval=1)  # fmt: skip
    finally:
        slurm_cluster.revive_node("n2")
    assert watcher.wait(timeout=600) == 0, (tmp_path / "wait.log").read_text()
    endings_seen = ended(run_dir)
    assert endings_seen[-1] == "finished" and endings_seen[0] in ("failed-requeued", "lost"), endings_seen
    rows = attempts.merged(run_dir)
    assert rows[0].get("reason"), rows[0]
    assert rows[-1]["first_step"] >= 5  # resumed, not started over
    assert metrics(run_dir) == metrics(reference2)
    assert_same_weights(valid_checkpoints(run_dir)[-1][1], valid_checkpoints(reference2)[-1][1])


@pytest.mark.slow
def test_a_dead_node_without_progress_stops_after_max_failures(slurm_cluster, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    """n2 dies before any checkpoint: the restart SLURM makes (NODE_FAIL, JobRequeue=1) does not run
    again with slurm.max_failures=0; the job ends FAILED, saying why."""
    two_nodes(slurm_cluster)
    env, run_dir = {**slurm_cluster.env, "DS_ACCELERATOR": "cpu"}, tmp_path / "nopro"
    args = job_args(sft_model, tmp_path, "nopro", *TWO_NODES, "training.max_steps=200", "checkpoints.save_every=1000",
                    "slurm.max_failures=0")  # fmt: skip
    watcher = follow(args, env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 2 or watcher.poll() is not None, timeout=400)
    job = job_id((tmp_path / "wait.log").read_text())
    slurm_cluster.kill_node("n2")
    try:
        wait_for(lambda: slurm_cluster.job_state(job) in ("PENDING", "REQUEUED", "FAILED") or watcher.poll() is not None,
                 timeout=180, interval=1)  # fmt: skip
    finally:
        slurm_cluster.revive_node("n2")
    assert watcher.wait(timeout=300) == 1, (tmp_path / "wait.log").read_text()
    said = (tmp_path / "wait.log").read_text()
    assert "not requeued" in said or "slurm.max_failures=0" in said or "does not run it again" in said, said
    slurm_cluster.wait_state(job, ["FAILED", "NODE_FAIL"], timeout=120)
    assert ended(run_dir)[-1] == "failed"
    assert "now: attempt" in status(run_dir)


@pytest.mark.slow
def test_wait_returns_when_the_job_ends_preempted(slurm_cluster, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    """PreemptMode=CANCEL and a trainer that cannot stop in the grace time (its processes kept stopped):
    the job ends PREEMPTED, without a result. submitit counts PREEMPTED as unfinished; --wait must still
    return, non-zero, with the reason and the command that resumes the run."""
    if "lowcancel" not in slurm_cluster.run(["sinfo", "-h", "-o", "%P"]).stdout:
        pytest.skip("needs the test cluster's PreemptMode=CANCEL partition (lowcancel)")
    env, run_dir = slurm_cluster.env, tmp_path / "pc"
    args = job_args(sft_model, tmp_path, "pc", "slurm.partition=lowcancel", "training.max_steps=200",
                    "checkpoints.save_every=1000", "traces.enabled=false")  # fmt: skip
    watcher = follow(args, env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 2 or watcher.poll() is not None, timeout=400)
    job = job_id((tmp_path / "wait.log").read_text())
    stopping = True

    def keep_stopped() -> None:  # SLURM sends SIGCONT with its SIGTERM: stop them again at once
        while stopping:
            trainers = [int(x.split(":")[0]) for x in processes(tmp_path.name) if "rlarith.cli train" in x]
            for pid in drivers(tmp_path.name) + trainers:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    import threading

    stopper = threading.Thread(target=keep_stopped, daemon=True)
    stopper.start()
    try:
        slurm_cluster.preempt(job)
        slurm_cluster.wait_state(job, ["PREEMPTED"], timeout=120)
    finally:
        stopping = False
        stopper.join()
    assert watcher.wait(timeout=240) == 1, (tmp_path / "wait.log").read_text()
    said = (tmp_path / "wait.log").read_text()
    assert "ended PREEMPTED and was not requeued" in said and "rlarith submit -c" in said, said


@pytest.mark.slow
def test_a_requeue_while_the_controller_is_down_is_asked_again(slurm_cluster, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    """slurmctld goes down (SIGTERM) as a stopped job's rank 0 asks for the requeue, and comes back 60 s
    later: the driver asks again until it answers, the job restarts and finishes, and the record says
    requeued. Before, one failed ``scontrol requeue`` ended the job."""
    env, run_dir = slurm_cluster.env, tmp_path / "retry"
    args = job_args(sft_model, tmp_path, "retry", "training.max_steps=8", "traces.enabled=false")
    watcher = follow(args, env, tmp_path / "wait.log")
    wait_for(lambda: logged_step(run_dir) >= 2 or watcher.poll() is not None, timeout=400)
    (driver,) = drivers(str(tmp_path / "submitit"))
    os.kill(_ctld_pid(slurm_cluster), signal.SIGTERM)  # the controller saves its state and exits
    os.kill(driver, signal.SIGUSR2)  # a stop from outside: the trainer saves, then rank 0 requeues
    try:
        time.sleep(60)  # past what one scontrol call waits for a controller (about 15 s)
    finally:
        started = subprocess.run(["bash", str(REPO / "slurm" / "testcluster.sh"), "start"], capture_output=True,
                                 text=True, timeout=300)  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert watcher.wait(timeout=400) == 0, (tmp_path / "wait.log").read_text()
    rows = attempts.merged(run_dir)
    assert [r.get("ended") for r in rows] == ["requeued", "finished"], rows
