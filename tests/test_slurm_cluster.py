"""The test cluster (slurm/testcluster.sh) does what the launcher's tests rely on, with real jobs and signals:
accounting reports real states, a job in ``low`` gets its ``--signal`` when a ``high`` job preempts it and is
requeued with ``SLURM_RESTART_COUNT=1``, and ``scontrol requeue`` works from inside a job.

Run ``pytest tests/test_slurm_cluster.py -s`` to see the measured preemption latencies.
"""

from __future__ import annotations

import operator
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import FINAL, SlurmCluster

from conftest import wait_for

# A job step that installs a USR2 handler, then marks its start; the first attempt runs until SLURM kills
# it, a restarted one exits at once. Markers are files named <what>.<SLURM_RESTART_COUNT or 0>.
VICTIM = """\
import os, signal, sys, time
out, attempt = sys.argv[1], os.environ.get("SLURM_RESTART_COUNT", "0")
def mark(what):
    with open(os.path.join(out, f"{what}.{attempt}"), "w") as f:
        f.write(repr(time.time()))
signal.signal(signal.SIGUSR2, lambda *_: mark("usr2"))
mark("start")
while attempt == "0":
    time.sleep(0.1)
"""

# A batch script that records each start and requeues itself from inside the job on the first one.
REQUEUER = """\
#!/bin/bash
echo "${SLURM_RESTART_COUNT:-0}" >> "$1/starts"
if [ -z "$SLURM_RESTART_COUNT" ]; then
    scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed: $?" >> "$1/starts"
    sleep 300
fi
"""


@pytest.fixture(autouse=True)
def no_job_left(slurm_cluster: SlurmCluster) -> Iterator[None]:
    """Whatever a test leaves in the queue is cancelled before the next one starts."""
    yield
    slurm_cluster.cancel_all()


def test_jobs_finish_with_their_real_state_in_accounting(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    ok = slurm_cluster.sbatch(["-p", "low", "-c", "1", "--mem=1G", "-o", str(tmp_path / "ok.out"),
                               "--wrap", f"echo $SLURM_JOB_ID > {tmp_path / 'ran'}"])  # fmt: skip
    bad = slurm_cluster.sbatch(["-p", "high", "-c", "1", "-o", "/dev/null", "--wrap", "exit 3"])
    assert slurm_cluster.wait_state(ok, FINAL) == "COMPLETED"
    assert (tmp_path / "ran").read_text().strip() == ok
    assert slurm_cluster.wait_state(bad, FINAL) == "FAILED"
    exit_code = slurm_cluster.run(["sacct", "-n", "-X", "-P", "-j", bad, "-o", "ExitCode"]).stdout.strip()
    assert exit_code == "3:0"


def test_submitit_sees_the_cluster_and_real_job_states(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(timeout_min=5, slurm_partition="low", cpus_per_task=1, mem_gb=1)
    job = executor.submit(operator.mul, 6, 7)
    assert job.result() == 42
    # The result file comes before the job's end reaches accounting; then submitit reads it from sacct.
    assert slurm_cluster.wait_state(job.job_id, FINAL) == "COMPLETED"
    assert job.get_info(mode="force")["State"] == "COMPLETED"


def test_preempted_job_gets_its_signal_and_restarts_requeued(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    (tmp_path / "victim.py").write_text(VICTIM)
    # No B: in --signal: the signal goes to the srun step's tasks, as with submitit and `srun rlarith train`.
    job = slurm_cluster.sbatch(["-p", "low", "-c", "1", "--requeue", "--time=10", "--signal=USR2@60",
                                "-o", str(tmp_path / "job.out"), "--open-mode=append",
                                "--wrap", f"srun {sys.executable} {tmp_path / 'victim.py'} {tmp_path}"])  # fmt: skip
    wait_for(lambda: (tmp_path / "start.0").exists(), timeout=120, interval=0.1)
    t_preempt = time.time()
    blocker = slurm_cluster.preempt(job)
    state = slurm_cluster.wait_state(job, FINAL, timeout=240)
    assert state == "COMPLETED", (slurm_cluster.job_states(job), (tmp_path / "job.out").read_text())
    assert (tmp_path / "usr2.0").exists(), "USR2 did not reach the step before the preemption killed it"
    assert (tmp_path / "start.1").exists(), "the job did not restart with SLURM_RESTART_COUNT=1"
    states = slurm_cluster.job_states(job)
    assert states[0] == "PREEMPTED" and states[-1] == "COMPLETED" and len(states) == 2, states
    assert slurm_cluster.wait_state(blocker, FINAL) == "COMPLETED"
    t_usr2 = float((tmp_path / "usr2.0").read_text())
    t_restart = float((tmp_path / "start.1").read_text())
    print(f"\npreemption (blocker submitted) -> USR2 in the step: {t_usr2 - t_preempt:.1f} s; "
          f"-> restart with SLURM_RESTART_COUNT=1: {t_restart - t_preempt:.1f} s")  # fmt: skip


def test_scontrol_requeue_from_inside_a_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    (tmp_path / "requeue.sh").write_text(REQUEUER)
    job = slurm_cluster.sbatch(["-p", "low", "-c", "1", "--requeue", "-o", str(tmp_path / "job.out"),
                                "--open-mode=append", str(tmp_path / "requeue.sh"), str(tmp_path)])  # fmt: skip
    state = slurm_cluster.wait_state(job, FINAL, timeout=240)
    assert state == "COMPLETED", (slurm_cluster.job_states(job), (tmp_path / "job.out").read_text())
    assert (tmp_path / "starts").read_text().split() == ["0", "1"]
    assert slurm_cluster.job_states(job) == ["REQUEUED", "COMPLETED"]
