"""A stand-in trainer for tests of what the job driver hands each rank (tests/test_multinode.py).

Put this folder on PYTHONPATH and set ``RANK_PROBE_DIR``: every Python process started as ``rlarith.cli
train`` (the trainer the real driver starts, with the environment it built) then writes what it was given
to ``RANK_PROBE_DIR/<job>.<restart>.<RANK>.json`` and exits 0 before importing torch, as a trainer that
finished would. Every other process (submitit, the driver) is left alone. Recorded: the rank variables,
``CUDA_VISIBLE_DEVICES``, the CPUs it may run on (its affinity mask), its hostname, and for each of the
node's GPU device files whether this process may open it (``ENXIO``: allowed by the job's device cgroup,
no driver behind it; ``EPERM``: not this job's).

With ``RANK_PROBE_HOLD`` set, rank 0 first listens on ``MASTER_ADDR:MASTER_PORT`` (as torch's TCPStore
does) and every rank waits until the file ``RANK_PROBE_HOLD`` exists: two jobs held at once show whether
their rendezvous collide ("bind" is then the error).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time


def _probe(out: str) -> None:
    cmdline = open("/proc/self/cmdline", "rb").read().split(b"\0")
    if b"rlarith.cli" not in cmdline or b"train" not in cmdline:
        return
    env = os.environ
    host = socket.gethostname()
    record = {
        "host": host,
        "env": {k: env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                        "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID",
                                        "SLURM_RESTART_COUNT", "SLURM_NODEID", "SLURM_LOCALID", "SLURM_PROCID")},
        "cpus": sorted(os.sched_getaffinity(0)),
        "gpus": {},
        "bind": None,
    }  # fmt: skip
    gpu_dir = os.path.join(env.get("RLARITH_SLURM_DIR", "/tmp/rlarith-slurm"), "dev", host)
    for name in sorted(os.listdir(gpu_dir)) if os.path.isdir(gpu_dir) else []:
        try:
            os.close(os.open(os.path.join(gpu_dir, name), os.O_RDWR))
            record["gpus"][name] = "opened"
        except OSError as err:
            record["gpus"][name] = errno.errorcode.get(err.errno, str(err.errno))
    hold = env.get("RANK_PROBE_HOLD")
    listener = None
    if hold and env.get("RANK") == "0":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((env["MASTER_ADDR"], int(env["MASTER_PORT"])))
            listener.listen()
        except OSError as err:
            record["bind"] = str(err)
    name = f"{env.get('SLURM_JOB_ID')}.{env.get('SLURM_RESTART_COUNT', '0')}.{env.get('RANK', '0')}.json"
    with open(os.path.join(out, name + ".tmp"), "w") as fh:
        json.dump(record, fh)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    # The driver starts the trainer with the stop signals blocked until its handler exists; the probe has
    # none: a stop signal ends it, as it would a trainer with nothing to save.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGUSR2, signal.SIGINT})
    while hold and not os.path.exists(hold):
        time.sleep(0.1)
    os._exit(0)


if os.environ.get("RANK_PROBE_DIR"):
    _probe(os.environ["RANK_PROBE_DIR"])
