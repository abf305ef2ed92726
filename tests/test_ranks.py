"""What the job driver hands each rank (rlarith/ranks.py), checked for the layouts real clusters give:
every rank's device is one it can see, rendezvous ports stay out of the ephemeral range and move on
requeue, and the config refuses a rank without a GPU. The same rules on the two-node cluster, through the
real driver: tests/test_multinode.py."""

from __future__ import annotations

import os

import pytest

from rlarith.config import ConfigError, SlurmConfig
from rlarith.ranks import PORT_RANGE, RankEnvError, gpu_env, master_addr, master_port, rank_env

EPHEMERAL = (32768, 60999)


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_every_rank_of_a_node_uses_a_distinct_gpu_it_can_see(gpus: int) -> None:
    """SLURM's default: each task sees the node's GPUs. cuda:LOCAL_RANK is then valid and distinct."""
    visible = ",".join(str(i) for i in range(gpus))
    devices = []
    for local in range(gpus):
        env = gpu_env(visible, local, gpus)
        seen = env["CUDA_VISIBLE_DEVICES"].split(",")
        assert seen == visible.split(","), "the node's GPUs stay visible (NCCL finds its peers)"
        devices.append(seen[int(env["LOCAL_RANK"])])
    assert sorted(devices) == visible.split(",")


def test_a_site_that_binds_one_gpu_per_task_gets_cuda_0() -> None:
    for local, gpu in enumerate(["4", "5", "6", "7"]):  # the second half of an 8-GPU node
        env = gpu_env(gpu, local, 4)
        assert env == {"CUDA_VISIBLE_DEVICES": gpu, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def test_too_few_gpus_for_the_ranks_is_a_clear_error() -> None:
    with pytest.raises(
        RankEnvError, match="sees 2 GPU.*4 ranks.*slurm.gpus_per_node equal to slurm.tasks_per_node"
    ):
        gpu_env("0,1", 3, 4)


def test_tasks_per_node_must_equal_gpus_per_node() -> None:
    with pytest.raises(
        ConfigError, match="slurm.tasks_per_node: must equal slurm.gpus_per_node.*got tasks_per_node=8"
    ):
        SlurmConfig(tasks_per_node=8, gpus_per_node=4)
    SlurmConfig(tasks_per_node=4, gpus_per_node=4)
    SlurmConfig(tasks_per_node=2, gpus_per_node=0)  # CPUs only: any number of ranks


def test_ports_stay_below_the_ephemeral_range_differ_by_job_and_move_on_requeue() -> None:
    low, high = PORT_RANGE
    assert high < EPHEMERAL[0]
    side_by_side = [master_port(str(job), 0) for job in range(5000, 5200)]
    assert len(set(side_by_side)) == 200 and all(low <= p <= high for p in side_by_side)
    requeues = [master_port("5000", restart) for restart in range(50)]
    assert len(set(requeues)) == 50, "every restart of one job meets on another port"
    assert master_port("123_4", 0) == master_port("123_4", 0)  # not a number: hashed, still stable


def test_a_users_master_port_is_replaced_and_said() -> None:
    env, notes = rank_env(
        {"MASTER_PORT": "29500", "SLURM_JOB_ID": "77"}, job_id="77", restart=2, rank=1, world_size=2,
        local_rank=1, local_world_size=2, hostnames=["localhost"], node=0, gpus=False,
    )  # fmt: skip
    assert env["MASTER_PORT"] == str(master_port("77", 2)) != "29500"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["RANK"] == "1" and env["LOCAL_RANK"] == "1"
    assert len(notes) == 1 and "MASTER_PORT=29500 from the submitting shell is not used" in notes[0]


def test_a_first_node_that_resolves_to_loopback_is_refused_across_nodes() -> None:
    assert master_addr("localhost", 1, True) == "127.0.0.1"
    with pytest.raises(RankEnvError, match="resolves to 127.0.0.1 \\(loopback\\).*/etc/hosts"):
        master_addr("localhost", 2, False)
    with pytest.raises(RankEnvError, match="does not resolve"):
        master_addr("no-such-node.invalid", 2, False)


def test_doctor_checks_the_ranks_a_job_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``rlarith doctor`` inside a job: the GPUs SLURM gave this task and its CPU mask, against the config."""
    from rlarith.config import RunConfig
    from rlarith.doctor import check_ranks

    cfg = RunConfig(slurm=SlurmConfig(nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=1))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert check_ranks(cfg).status == "OK"  # outside a job: the plan only
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # two GPUs for four ranks
    check = check_ranks(cfg)
    assert check.status == "FAIL" and "sees 2 GPU(s)" in check.detail, check
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert check_ranks(cfg).status == "OK"
    many = RunConfig(slurm=SlurmConfig(cpus_per_task=len(os.sched_getaffinity(0)) + 1))
    check = check_ranks(many)
    assert check.status == "WARN" and "srun --cpus-per-task" in check.detail, check
