"""Multi-node jobs on the two-node test cluster (tests/slurm_cluster.py): the real ``rlarith submit``, the
real driver in every task, real SLURM allocations (GPUs as GRES with a device cgroup, cores bound by
task/affinity), real signals.

Where a test asks what each rank was given, the trainer is tests/rank_probe (on PYTHONPATH): the driver
starts ``rlarith train`` exactly as always, and the probe records the environment, CPU mask and device
permissions that process got, then exits 0 before it would import torch.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from slurm_cluster import FINAL, SlurmCluster
from test_submit import job_args, job_id, logged_step, submit
from test_train import assert_same_weights, metrics

from conftest import REPO, rlarith_env, wait_for
from rlarith import attempts
from rlarith.checkpoints import valid_checkpoints
from rlarith.grace import partition_grace_s, verdict
from rlarith.ranks import PORT_RANGE

PROBE = REPO / "tests" / "rank_probe"


def probe_env(cluster: SlurmCluster, out: Path, **extra: str) -> dict[str, str]:
    out.mkdir(exist_ok=True)
    return {**cluster.env, "PYTHONPATH": str(PROBE), "RANK_PROBE_DIR": str(out), **extra}


def records(out: Path, pattern: str = "*.json") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(pattern))]


def stand_in_model(tmp_path: Path) -> Path:
    """What ``rlarith submit`` checks before submitting (a config.json); the probe never loads it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def device_of(record: dict) -> str:
    """The GPU a rank would use, as its device file: DeepSpeed and accelerate pick cuda:LOCAL_RANK, and CUDA
    numbers the GPUs this process may open (its device cgroup lets it: ENXIO here, no driver behind the file)
    in order, then CUDA_VISIBLE_DEVICES indexes those."""
    visible = (record["env"]["CUDA_VISIBLE_DEVICES"] or "").split(",")
    local = int(record["env"]["LOCAL_RANK"])
    assert 0 <= local < len(visible), f"cuda:{local} is not among CUDA_VISIBLE_DEVICES={visible} ({record})"
    allowed = [name for name, status in sorted(record["gpus"].items()) if status == "ENXIO"]
    index = int(visible[local])
    assert 0 <= index < len(allowed), f"CUDA_VISIBLE_DEVICES={visible}: no GPU {index} among {allowed}"
    return allowed[index]


@pytest.mark.slow
@pytest.mark.parametrize("site", ["gpus-per-node", "one-gpu-per-task"])
def test_every_rank_gets_a_distinct_valid_gpu_of_its_node(
    slurm_cluster: SlurmCluster, tmp_path: Path, site: str
) -> None:
    """2 nodes x 2 ranks x 2 GPUs. As SLURM hands them out by default (every task sees the node's GPUs), and
    at a site that binds one GPU to each task (``--gpu-bind=per_task:1``, here through SBATCH_GPU_BIND: each
    task's device cgroup then holds its one GPU, and SLURM sets CUDA_VISIBLE_DEVICES=0 in every task): every
    rank's device is one it can see, a GPU of its own node's allocation, and no two ranks of a node share
    one."""
    out = tmp_path / "probe"
    extra = {"SBATCH_GPU_BIND": "per_task:1"} if site == "one-gpu-per-task" else {}
    env = probe_env(slurm_cluster, out, **extra)
    args = job_args(stand_in_model(tmp_path), tmp_path, "gpus", "slurm.nodes=2", "slurm.tasks_per_node=2",
                    "slurm.gpus_per_node=2")  # fmt: skip
    done = submit(args, env, "--wait", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = records(out)
    assert sorted(int(r["env"]["RANK"]) for r in ranks) == [0, 1, 2, 3], ranks
    by_node: dict[str, list[str]] = {}
    for r in ranks:
        by_node.setdefault(r["host"], []).append(device_of(r))
        assert r["env"]["MASTER_ADDR"] == socket.gethostbyname("n1")  # the first node, as an address
        assert len(r["cpus"]) == 1  # slurm.cpus_per_task=1, bound by task/affinity
    assert sorted(by_node) == ["n1", "n2"]
    assert all(len(set(devices)) == 2 for devices in by_node.values()), by_node


@pytest.mark.slow
def test_cpus_per_task_reaches_every_rank(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """2 nodes x 1 rank x 2 CPUs: each rank's affinity mask holds both. SLURM_EXACT makes every srun step get
    only what it asks for, as on nodes larger than the job (here a node has only the 2 CPUs the job holds,
    and a step would otherwise get them all anyway): without --cpus-per-task restated on srun, SLURM 22.05
    gives each rank one CPU."""
    out = tmp_path / "probe"
    env = probe_env(slurm_cluster, out, SLURM_EXACT="1")
    args = job_args(stand_in_model(tmp_path), tmp_path, "cpus", "slurm.nodes=2", "slurm.tasks_per_node=1",
                    "slurm.cpus_per_task=2")  # fmt: skip
    done = submit(args, env, "--wait", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = records(out)
    assert len(ranks) == 2 and {r["host"] for r in ranks} == {"n1", "n2"}, ranks
    assert all(r["cpus"] == [0, 1] for r in ranks), [(r["host"], r["cpus"]) for r in ranks]


@pytest.mark.slow
def test_jobs_side_by_side_never_share_a_rendezvous_port_and_a_requeue_moves_it(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Two 2-node jobs at once, both with rank 0 on n1, each holding its rendezvous port open there (as
    torch's TCPStore does): different ports, both outside the ephemeral range, both bound. Then one job is
    requeued: its next attempt meets on another port. A MASTER_PORT exported at submission is not used."""
    out, hold = tmp_path / "probe", tmp_path / "release"
    env = probe_env(slurm_cluster, out, RANK_PROBE_HOLD=str(hold), MASTER_PORT="29500")
    jobs = []
    model = stand_in_model(tmp_path)
    for name in ("a", "b"):
        args = job_args(model, tmp_path, name, "slurm.nodes=2", "slurm.tasks_per_node=1")
        done = submit(args, env)
        assert done.returncode == 0, done.stdout + done.stderr
        jobs.append(job_id(done.stdout))
    a, b = jobs
    try:
        wait_for(lambda: len(records(out, "*.0.*.json")) == 4, timeout=180, interval=0.2)
        first = {r["env"]["SLURM_JOB_ID"]: r for r in records(out, "*.0.0.json")}
        ports = {job: int(first[job]["env"]["MASTER_PORT"]) for job in jobs}
        assert first[a]["host"] == first[b]["host"] == "n1", first
        assert ports[a] != ports[b] and all(PORT_RANGE[0] <= p <= PORT_RANGE[1] for p in ports.values()), (
            ports
        )
        assert first[a]["bind"] is None and first[b]["bind"] is None, first  # both listen at once
        slurm_cluster.run(["scontrol", "requeue", a])
        wait_for(lambda: (out / f"{a}.1.0.json").exists(), timeout=240, interval=0.2)
        again = json.loads((out / f"{a}.1.0.json").read_text())
        assert int(again["env"]["MASTER_PORT"]) not in ports.values(), (again, ports)
        assert again["bind"] is None
    finally:
        hold.touch()
    for job in jobs:
        assert slurm_cluster.wait_state(job, FINAL, timeout=120) == "COMPLETED"
    logs = "".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_0_log.err"))
    assert "MASTER_PORT=29500 from the submitting shell is not used" in logs


def test_the_grace_budget_counts_the_qos_grace_time(slurm_cluster: SlurmCluster) -> None:
    """Partition ``low`` gives 15 s after a preemption's signal, the QOS ``grace`` 10 s: a job in both must
    fit its checkpoint in the shorter (SLURM uses the QOS's under preempt/qos)."""
    assert partition_grace_s("low") == 15
    assert partition_grace_s("low", "grace") == 10
    assert partition_grace_s("", "grace") == 10
    assert verdict(2.0, 4.0, 120, partition_grace_s("low", "grace"))[0] == "WARN"  # 6 s of 10: under 2x


# ------------------------------------------------------------------ 2 nodes x 2 ranks, ZeRO-2, preempted

README = REPO / "README.md"
TWO_NODES_STEPS = 8


def readme_command() -> str:
    """The README's multi-node command (the ``rlarith submit`` line after "the two-node test cluster")."""
    text = README.read_text()
    block = text[text.index("# 2 nodes x 2 ranks on the two-node test cluster") :]
    lines = block[block.index("DS_ACCELERATOR=cpu rlarith submit") :].splitlines()
    command = []
    for line in lines:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(command)


def checkout(tmp_path: Path, sft_model: Path) -> Path:
    """A working folder as in a clone after ``make demo``: configs/, and the tiny model where the default
    config looks for it (runs/bootstrap/model)."""
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "default.yaml").write_text((REPO / "configs" / "default.yaml").read_text())
    (work / "runs" / "bootstrap").mkdir(parents=True)
    (work / "runs" / "bootstrap" / "model").symlink_to(sft_model)
    return work


@pytest.fixture(scope="module")
def four_rank_reference(sft_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README command's run without SLURM: torchrun, 4 ranks on this machine."""
    work = checkout(tmp_path_factory.mktemp("ref4"), sft_model)
    overrides = [a for a in shlex.split(readme_command()) if "=" in a and not a.startswith(("slurm.", "DS_"))]
    overrides = [a if not a.startswith("name=") else "name=ref" for a in overrides]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "29581",
                "-m", "rlarith.train", "-c", "configs/default.yaml", *overrides]  # fmt: skip
    log = work / "ref.log"
    proc = subprocess.run(torchrun, cwd=work, env=rlarith_env(DS_ACCELERATOR="cpu"), stdout=subprocess.DEVNULL,
                          stderr=log.open("w"), timeout=900)  # fmt: skip
    assert proc.returncode == 0, log.read_text()[-3000:]
    return work / "runs" / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("partition", ["low", "lowcancel"])
def test_readme_two_node_command_preempted_resumes_bitwise(
    slurm_cluster: SlurmCluster, sft_model: Path, tmp_path: Path, four_rank_reference: Path, partition: str
) -> None:
    """The README's command as written (2 nodes x 2 ranks, ZeRO-2 over gloo), preempted by a high job on
    both nodes: in ``low`` SLURM requeues it (PreemptMode=REQUEUE), in ``lowcancel`` SLURM would cancel it
    and the driver requeues it itself (PreemptMode=CANCEL). Every logged metric and the final weights equal
    the uninterrupted 4-rank torchrun run, bit for bit, and the traces hold each step once."""
    work = checkout(tmp_path, sft_model)
    command = readme_command()
    if partition != "low":  # the same command in the other partition (a later key=value wins)
        command = command.replace(" --wait", f" slurm.partition={partition} --wait")
    env = rlarith_env(**slurm_cluster.env)
    env["PATH"] = (
        f"{Path(sys.executable).parent}:{env['PATH']}"  # `rlarith`, as after `source .venv/bin/activate`
    )
    log = tmp_path / "wait.log"
    watcher = subprocess.Popen(["bash", "-c", command], cwd=work, env=env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT)  # fmt: skip
    run_dir = work / "runs" / "two-nodes"
    try:
        wait_for(lambda: logged_step(run_dir) >= 2 or watcher.poll() is not None, timeout=600, interval=0.2)
        job = job_id(log.read_text())
        assert sorted(slurm_cluster.job_nodes(job)) == ["n1", "n2"]
        preempted_at = time.time()
        slurm_cluster.preempt(job, hold_s=2)
        assert watcher.wait(timeout=600) == 0, log.read_text()
    finally:
        if watcher.poll() is None:
            watcher.kill()
    rows = attempts.merged(run_dir)
    assert [r.get("ended") for r in rows] == ["preempted", "finished"], rows
    assert rows[1]["first_step"] == rows[0]["checkpoint"] + 1 < TWO_NODES_STEPS
    assert metrics(run_dir) == metrics(four_rank_reference)
    last, ref_last = valid_checkpoints(run_dir)[-1][1], valid_checkpoints(four_rank_reference)[-1][1]
    assert any(last.glob("global_step*")), "DeepSpeed shards are in the checkpoint"
    assert_same_weights(last, ref_last)
    import rlarith.traces

    frame = rlarith.traces.open(run_dir).frame()
    assert sorted(frame["step"].unique()) == list(range(1, TWO_NODES_STEPS + 1))
    assert (frame.groupby("step").size() == 64).all()  # each step once: 8 problems x 8 completions
    assert sorted(frame["rank"].unique()) == [0, 1, 2, 3]
    # The intervals docs/slurm.md reports (pytest -s shows them).
    seconds = lambda iso: datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()  # noqa: E731
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = min(seconds(r["time"]) for r in steps if "loss" in r and r["step"] == rows[1]["first_step"])
    first, second = rows
    print(f"\n{partition}: preemption -> USR2 at the driver {seconds(first['signalled']) - preempted_at:.1f} s; "
          f"-> saved exit (4 ranks) {seconds(first['end']) - seconds(first['signalled']):.1f} s; exit -> restart "
          f"{seconds(second['start']) - seconds(first['end']):.1f} s; restart -> first new step "
          f"{resumed - seconds(second['start']):.1f} s; exit -> first new step {resumed - seconds(first['end']):.1f} s")  # fmt: skip
