"""A real two-node SLURM for the tests: the session fixture ``slurm_cluster`` (registered in conftest.py).

The fixture starts the cluster with ``slurm/testcluster.sh start`` (which installs the Debian packages on a
machine that lacks them, as root) and leaves it running after the session, so the next start is a no-op.
One test session at a time holds it (an flock; a second session waits). Where it cannot start (not root,
no apt-get, a daemon that does not come up) the tests that need it skip with the script's reason, except
under ``CI=true``, where that is a failure: CI starts the cluster itself (.ci/run), and a skip there would
hide a broken cluster.

The cluster: nodes ``n1`` and ``n2`` (``SlurmCluster.nodes``), each a network namespace with its own address
(10.77.0.11, .12), hostname and slurmd, 2 CPUs (this machine's, shared) and a GRES ``gpu:4`` of device files
(SLURM sets ``CUDA_VISIBLE_DEVICES`` per allocation); ``proctrack/cgroup``, ``task/cgroup,task/affinity``,
``KillWait=30``, ``SlurmdTimeout=30``; partitions ``low`` (preempted with ``PreemptMode=REQUEUE``),
``lowcancel`` (``PreemptMode=CANCEL``), both ``GraceTime=15``, and ``high``, which preempts them; QOS ``grace``
(``GraceTime=10``).
A job with ``--signal`` gets that signal at preemption, one without gets SIGTERM. The clients (sbatch,
sacct, scontrol, srun...) are on PATH through ``env`` (wrappers that enter the head's namespace). Helpers
for multi-node tests: ``node_run(node, cmd, **kw)`` runs a command "on" a node (its network and hostname;
``subprocess.run`` keywords; ``node_command`` gives the argv for a Popen); ``kill_node(node)`` is a power
loss (the node's link goes down first, then SIGKILL to its slurmd and every process on it, job tasks
included); ``link_down(node)``/``link_up(node)`` take its link away and back (peers see silence, no reset);
``revive_node(node)`` brings it back (link up, slurmd restarted, node resumed) and waits until SLURM can use
it. ``preempt(job)`` submits a ``high`` job that takes every node ``job`` runs on; ``job_nodes(job)`` names
them. A test that kills a node or takes its link down must revive it (in a ``finally``); the next session's
start heals what one left behind.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "testcluster.sh"

# Job states after which a job never runs again (sacct's names; "CANCELLED by 0" is cut to its first word).
FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE"})  # fmt: skip


class SlurmCommandError(RuntimeError):
    """A SLURM client command exited non-zero; the message holds the command and what it printed."""


@dataclass(frozen=True)
class SlurmCluster:
    """The running test cluster and the few operations the tests need, all through the real clients."""

    conf: Path  # slurm.conf; SLURM_CONF for every client, submitit and the jobs
    env: dict[str, str]  # merge into a subprocess's environment: {**os.environ, **cluster.env}
    cpus: int  # CPUs of each node
    nodes: list[str] = dataclasses.field(default_factory=list)  # node names: n1, n2

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command with the cluster's environment, capturing text output; raise on failure if ``check``."""
        proc = subprocess.run(
            cmd, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise SlurmCommandError(
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
            )
        return proc

    def sbatch(self, args: list[str]) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        return self.run(["sbatch", "--parsable", *args]).stdout.strip().split(";")[0]

    def job_states(self, job_id: str) -> list[str]:
        """Every attempt's state, oldest first, from accounting (sacct --duplicates): a requeued job has several."""
        out = self.run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State"]).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def job_state(self, job_id: str) -> str:
        """The job's current state: PENDING, RUNNING, REQUEUED, PREEMPTED, COMPLETED, FAILED, TIMEOUT, ...

        From accounting (sacct), like submitit; it lags the controller by a moment (a job may be running
        while sacct still says PENDING). Before slurmctld has told slurmdbd of a new job at all, the
        controller's own state (scontrol) answers.
        """
        states = self.job_states(job_id)
        if states:
            return states[-1]
        proc = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        for field in proc.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        raise SlurmCommandError(f"job {job_id} is unknown to sacct and to scontrol: {proc.stderr.strip()}")

    def wait_state(self, job_id: str, states: Iterable[str], timeout: float = 120) -> str:
        """Poll until the job is in one of ``states``; returns it. A TimeoutError names the last state seen."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if time.monotonic() > deadline:
                job = self.run(["scontrol", "show", "job", job_id], check=False).stdout
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout} s, waiting for {sorted(wanted)}:\n{job}"
                )
            time.sleep(0.25)

    def job_nodes(self, job_id: str) -> list[str]:
        """The nodes a running job holds (``scontrol show hostnames`` of its node list)."""
        nodelist = self.run(["squeue", "-h", "-j", job_id, "-o", "%N"]).stdout.strip()
        if not nodelist:
            return []
        return self.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()

    def preempt(self, job_id: str, hold_s: float = 1, partition: str = "high") -> str:
        """Submit a job to ``high`` that needs every node ``job_id`` runs on, so it preempts ``job_id``
        (running in ``low`` or ``lowcancel``).

        Waits (up to a minute) until accounting shows the victim RUNNING, as there is nothing to preempt
        before. The blocker sleeps ``hold_s`` once it runs (after the victim's GraceTime). Returns its id.
        """
        self.wait_state(job_id, {"RUNNING"}, timeout=60)
        nodes = self.job_nodes(job_id) or self.nodes
        return self.sbatch(["-p", partition, "-N", str(len(nodes)), "-w", ",".join(nodes), "--exclusive",
                            "-J", "rlarith-preempt", "-o", "/dev/null", "--wrap", f"sleep {hold_s}"])  # fmt: skip

    # ---------------------------------------------------------------------- nodes: run on, kill, revive

    def node_command(self, node: str, cmd: list[str]) -> list[str]:
        """The argv that runs ``cmd`` on ``node`` (its network namespace and hostname), for a Popen."""
        return ["bash", str(SCRIPT), "exec", node, *cmd]

    def node_run(self, node: str, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """``subprocess.run(cmd)`` on ``node``, with the cluster's environment; captures text output and
        raises on failure unless told otherwise (``check=False``, ``capture_output=False``...)."""
        kw.setdefault("check", True)
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        kw["env"] = {**os.environ, **self.env, **kw.get("env", {})}
        return subprocess.run(self.node_command(node, cmd), **kw)

    def _script(self, *args: str, timeout: float = 120) -> str:
        proc = _script(*args, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmCommandError(
                f"testcluster.sh {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc.stdout

    def kill_node(self, node: str) -> None:
        """A power loss: the node's link goes down (no FIN or RST reaches the others), then its slurmd and
        every process on it (slurmstepd, job tasks) get SIGKILL. SLURM notices after SlurmdTimeout (30 s)."""
        self._script("kill-node", node)

    def link_down(self, node: str) -> None:
        """Take the node's link down: its peers' packets vanish without a reset; its processes live on."""
        self._script("link-down", node)

    def link_up(self, node: str) -> None:
        """Bring the node's link back."""
        self._script("link-up", node)

    def revive_node(self, node: str) -> None:
        """Bring a killed node back: link up, slurmd started again, node resumed; returns once SLURM can
        use it (idle, mixed or allocated)."""
        self._script("revive", node)

    def cancel_all(self, timeout: float = 90) -> None:
        """Cancel every job, pending or running, and wait until the queue is empty (KillWait is 30 s)."""
        deadline = time.monotonic() + timeout
        while jobs := self.run(["squeue", "-h", "-o", "%i"]).stdout.split():
            self.run(["scancel", *jobs], check=False)
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {' '.join(jobs)} still in the queue {timeout} s after scancel")
            time.sleep(0.25)


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def cluster_env() -> dict[str, str]:
    """What ``testcluster.sh env`` exports (SLURM_CONF, RLARITH_SLURM_DIR, ...); needs no running cluster."""
    env = {}
    for line in _script("env", timeout=60).stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


def start_cluster() -> SlurmCluster:
    """Start (or find) the cluster; raise RuntimeError with the script's message when it cannot start."""
    try:
        # The first start on a clean machine installs packages (about a minute); later ones take seconds.
        proc = _script("start", timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{SCRIPT} start did not finish: {e}") from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"{SCRIPT} start failed (exit {proc.returncode}):\n{proc.stderr.strip() or proc.stdout}"
        )
    env = cluster_env()
    nodes = env["RLARITH_SLURM_NODES"].split(",")
    cluster = SlurmCluster(conf=Path(env["SLURM_CONF"]), env=env, cpus=0, nodes=nodes)
    cpus = int(cluster.run(["sinfo", "-h", "-p", "low", "-o", "%c"]).stdout.split()[0])
    return SlurmCluster(conf=cluster.conf, env=env, cpus=cpus, nodes=nodes)


def hold_cluster(folder: Path) -> IO[str] | None:
    """Take the cluster in ``folder`` for this process: a second test session waits until the first ends.

    One cluster serves every session on the machine, and tests preempt, cancel and fill it; two sessions at
    once would break each other's jobs (and a start that finds a changed config restarts the daemons).
    The lock is an flock, so a killed session frees it. None where the folder cannot hold a lock file
    (another user's cluster not started yet): then the start that follows says why.
    """
    path = folder / "session.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = path.open("a+")
    except OSError:
        try:
            fh = path.open()  # another user's cluster: an flock needs only a readable file
        except OSError:
            return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        sys.__stderr__.write(f"\nslurm_cluster: waiting for the test cluster, in use by {holder} ({path})\n")
        fcntl.flock(fh, fcntl.LOCK_EX)
    if fh.writable():
        fh.truncate(0)
        fh.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
        fh.flush()
    return fh


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The two-node test cluster, this session's alone, its queue empty; SLURM_CONF and the clients' PATH
    exported for submitit."""
    lock = hold_cluster(Path(cluster_env()["RLARITH_SLURM_DIR"]))
    try:
        try:
            cluster = start_cluster()
        except RuntimeError as e:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI=true and the SLURM test cluster did not start:\n{e}", pytrace=False)
            pytest.skip(f"no SLURM test cluster: {e}")
        # submitit runs sbatch/sacct from this process and its jobs inherit this environment.
        os.environ.update(cluster.env)
        cluster.cancel_all()  # left by a session that was killed
        try:
            yield cluster
        finally:
            cluster.cancel_all()
    finally:
        if lock is not None:
            lock.close()
