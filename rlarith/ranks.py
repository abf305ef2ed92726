"""What each rank's trainer gets from the job driver: torch.distributed's rendezvous and ranks, and its GPU.

``rlarith.launch.TrainJob`` calls :func:`rank_env` in every task of a multi-task job. Each rule answers a
way a real cluster breaks a job:

- **GPUs.** Every rank sees its node's GPUs and uses ``cuda:LOCAL_RANK``, as torchrun, Lightning and
  torchtitan arrange it and as DeepSpeed (``set_device(local_rank)``, ``init_process_group(device_id=...)``)
  and accelerate assume. ``CUDA_VISIBLE_DEVICES`` is never narrowed while ``LOCAL_RANK`` stays 0..N-1: a rank
  with ``LOCAL_RANK`` >= 1 would ask for a device it cannot see. A site that binds one GPU to each task
  (``--gpus-per-task=1``, ``--gpu-bind``) leaves a rank one visible GPU: that rank gets ``LOCAL_RANK=0`` of
  ``LOCAL_WORLD_SIZE=1``, the same device by the same rule. Whatever SLURM hands over, the device index a
  rank will use is checked against what it sees before the trainer starts (:func:`gpu_env`).
- **Rendezvous port.** Below Linux's ephemeral range (32768-60999, where outgoing connections take their
  local ports, so a port drawn there can be taken by anyone), different for jobs that run side by side, and
  different at every restart of the same job, so one collision does not repeat on every requeue
  (:func:`master_port`). A ``MASTER_PORT`` exported by the user at submission is replaced, and said so.
- **Rendezvous address.** The first node's name resolved to an address (not the name: a node name may
  resolve differently on each node, or not at all inside an image), refused when it is a loopback address
  on a multi-node job or, on the first node, not one of its own addresses (:func:`master_addr`).

No torch here: it runs on the host, before the container starts.
"""

from __future__ import annotations

import ipaddress
import socket
import zlib
from collections.abc import Mapping

PORT_RANGE = (20000, 32767)
"""Rendezvous ports: below Linux's default ephemeral range (``net.ipv4.ip_local_port_range`` 32768-60999)."""
RESTART_STRIDE = 7919
"""How far a restart moves the port (a prime, so restarts of one job visit every port before repeating)."""


class RankEnvError(RuntimeError):
    """The job's allocation cannot give each rank a valid device or rendezvous; the message says the fix."""


def _job_number(job_id: str) -> int:
    """SLURM job ids are numbers (an array task's ``123_4`` uses its own ``SLURM_JOB_ID``); anything else is
    hashed."""
    return int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())


def master_port(job_id: str, restart: int) -> int:
    """The rendezvous port of one attempt of one job: jobs with nearby ids (those that run side by side)
    get different ports, and every restart moves to another.

    >>> master_port("1000", 0), master_port("1001", 0), master_port("1000", 1)
    (21000, 21001, 28919)
    >>> all(PORT_RANGE[0] <= master_port(str(j), r) <= PORT_RANGE[1] for j in range(0, 99999, 97) for r in range(9))
    True
    """
    low, high = PORT_RANGE
    span = high - low + 1
    return low + (_job_number(job_id) + RESTART_STRIDE * restart) % span


def master_addr(node: str, nodes: int, on_first_node: bool) -> str:
    """The IPv4 address of ``node`` (the job's first node) that every rank connects to.

    ``nodes`` is the job's node count; on the first node itself (``on_first_node``) the address must be one
    of its own: the rendezvous listens there.
    """
    here = socket.gethostname()
    try:
        infos = socket.getaddrinfo(node, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as err:
        raise RankEnvError(
            f"the job's first node {node!r} does not resolve to an address on node {here!r} ({err}); the "
            "ranks meet there. Make the node names resolvable on the compute nodes (DNS or /etc/hosts)."
        ) from None
    addr = str(infos[0][4][0])
    if nodes > 1 and ipaddress.ip_address(addr).is_loopback:
        raise RankEnvError(
            f"the job's first node {node!r} resolves to {addr} (loopback) on node {here!r}: ranks on the "
            "other nodes cannot reach it there. Fix the node's entry in /etc/hosts (its name must resolve "
            "to the address the other nodes reach), or run on one node (slurm.nodes=1)."
        )
    if on_first_node:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((addr, 0))
        except OSError as err:
            raise RankEnvError(
                f"the job's first node {node!r} resolves to {addr}, which is not an address of that node "
                f"({err}); the rendezvous cannot listen there. Fix the name's entry in DNS or /etc/hosts."
            ) from None
    return addr


def gpu_env(visible: str, local_rank: int, local_world_size: int) -> dict[str, str]:
    """``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` (and ``CUDA_VISIBLE_DEVICES``, never narrowed) for a rank that
    sees ``visible`` (SLURM's ``CUDA_VISIBLE_DEVICES`` for this task), so that ``cuda:LOCAL_RANK`` is a GPU
    it can see.

    >>> gpu_env("0,1,2,3", 2, 4)
    {'CUDA_VISIBLE_DEVICES': '0,1,2,3', 'LOCAL_RANK': '2', 'LOCAL_WORLD_SIZE': '4'}
    >>> gpu_env("3", 3, 4)  # the site bound one GPU to this task
    {'CUDA_VISIBLE_DEVICES': '3', 'LOCAL_RANK': '0', 'LOCAL_WORLD_SIZE': '1'}
    """
    devices = [d for d in visible.split(",") if d.strip()]
    if len(devices) >= local_world_size:  # the node's GPUs: cuda:LOCAL_RANK, as torchrun does
        env = {"LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world_size)}
    elif len(devices) == 1:  # one GPU bound to this task: it is cuda:0
        env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    else:
        raise RankEnvError(
            f"this task sees {len(devices)} GPU(s) (CUDA_VISIBLE_DEVICES={visible!r}) for {local_world_size} "
            f"ranks on its node, so rank {local_rank} of the node has no GPU of its own. Ask for one GPU per "
            "rank: slurm.gpus_per_node equal to slurm.tasks_per_node."
        )
    index = int(env["LOCAL_RANK"])
    if not 0 <= index < len(devices):  # unreachable by the rules above; a crash here beats one in NCCL
        raise RankEnvError(f"LOCAL_RANK={index} is not a GPU among CUDA_VISIBLE_DEVICES={visible!r}")
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices), **env}


def rank_env(
    environ: Mapping[str, str],
    *,
    job_id: str,
    restart: int,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    hostnames: list[str],
    node: int,
    gpus: bool,
) -> tuple[dict[str, str], list[str]]:
    """The variables to set in a rank's trainer environment, and notes for its log.

    ``hostnames``: the job's nodes, first one first; ``node``: this task's node (SLURM_NODEID); ``gpus``: the job asked
    for GPUs (``slurm.gpus_per_node``); ``environ``: the task's environment as SLURM started it.
    """
    port = master_port(environ.get("SLURM_JOB_ID") or job_id, restart)
    env = {
        "MASTER_ADDR": master_addr(hostnames[0], len(hostnames), node == 0),
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
    }
    notes = []
    for key in ("MASTER_PORT", "MASTER_ADDR"):
        if environ.get(key) and environ[key] != env[key]:
            notes.append(
                f"{key}={environ[key]} from the submitting shell is not used: this attempt meets at "
                f"{env['MASTER_ADDR']}:{port} (first node {hostnames[0]}; the port follows the job id and "
                "the restart count, below the ephemeral range)"
            )
    if gpus and environ.get("CUDA_VISIBLE_DEVICES"):
        env.update(gpu_env(environ["CUDA_VISIBLE_DEVICES"], local_rank, local_world_size))
    return env, notes
