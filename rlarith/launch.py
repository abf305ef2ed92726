"""``rlarith submit``: a run as a submitit job on SLURM (or this machine), and the driver that runs in it.

How a SLURM run survives preemption and time limits:

1. ``submit`` resolves the config (paths made absolute, written next to submitit's logs) and submits a
   ``TrainJob`` through submitit: ``sbatch --requeue --signal=USR2@<slurm.signal_delay_s>``, one task per
   rank, ``srun`` starting submitit's runner in each task.
2. In every task, ``TrainJob.__call__`` (the job driver, on the host) builds the rank's torch.distributed
   environment from the job, starts ``rlarith train`` as a child process (inside ``apptainer exec`` when
   ``slurm.container`` is set), forwards USR2/TERM/INT to it and waits. It replaces submitit's own USR2
   handler, which would requeue from the signal handler while the trainer is still saving.
3. The trainer answers a signal at the next step boundary: every rank saves its part of a full checkpoint,
   and exits 75 (``rlarith.preemption.EXIT_STOPPED``). Then rank 0's driver asks SLURM why the job was
   signalled (``scontrol show job``: a preemption time, or the end time close), and requeues the job from
   the host (``scontrol requeue``; images often lack ``scontrol``). SLURM restarts the same job id, which
   runs the same driver, and every start of the trainer is a resume.
4. Exit 0 is the job's result. Anything else fails the job with the trainer's last lines of stderr, and is
   never requeued. Time limits count against ``slurm.max_timeouts``; preemptions are requeued without limit.

Every attempt is appended to ``<run>/attempts.jsonl`` (``rlarith.attempts``); ``rlarith status RUN`` reads it.
This module never imports torch: it runs on login nodes and outside the container.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rlarith import attempts, metrics
from rlarith.checkpoints import valid_checkpoints
from rlarith.config import ConfigError, RunConfig, save_config
from rlarith.grace import measured_times, partition_grace_s, verdict
from rlarith.preemption import EXIT_STOPPED, block_stop_signals
from rlarith.training.identity import iso_time

FORWARDED = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
SLURM_SIGNAL_EARLY_S = 60
"""SLURM may send ``--signal`` up to this many seconds before the time asked for."""


class JobFailed(RuntimeError):
    """The job ended without finishing the run; the message says why and what to do."""


# ------------------------------------------------------------------------------------------- submit side


def absolute(cfg: RunConfig) -> RunConfig:
    """The config with every path made absolute, so the job does not depend on its working directory."""

    def fix(path: str) -> str:
        return str(Path(path).expanduser().absolute()) if path else path

    model = cfg.model.path
    if not Path(model).is_absolute() and Path(model).exists():  # else a hub-style name: leave it
        model = fix(model)
    return dataclasses.replace(
        cfg,
        runs_dir=fix(cfg.runs_dir),
        model=dataclasses.replace(cfg.model, path=model),
        traces=dataclasses.replace(cfg.traces, dir=fix(cfg.traces.dir)),
        slurm=dataclasses.replace(cfg.slurm, logs_dir=fix(cfg.slurm.logs_dir)),
    )


def sbatch_parameters(cfg: RunConfig) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters (sbatch options) for a run."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "job_name": f"rlarith-{cfg.name}",
        "time": s.timeout_min,
        "nodes": s.nodes,
        "ntasks_per_node": s.tasks_per_node,
        "cpus_per_task": s.cpus_per_task,
        "mem": f"{s.mem_gb}GB",
        "signal_delay_s": s.signal_delay_s,
        "additional_parameters": {"requeue": True},  # preemption requeues only requeueable jobs
    }
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    return params


def job_folder(cfg: RunConfig) -> Path:
    """submitit's folder for this run's jobs (logs, pickles, the frozen config)."""
    return Path(cfg.slurm.logs_dir or Path(cfg.runs_dir) / "submitit") / cfg.name


def submitit_command(folder: Path) -> str:
    """What the sbatch script runs in every task (submitit's runner, with this Python)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def dry_run(cfg: RunConfig) -> str:
    """The resolved resources and, for SLURM, the batch script ``submit`` would send."""
    cfg = absolute(cfg)
    s = cfg.slurm
    lines = [
        f"run: {cfg.run_dir}",
        f"executor: {s.executor}",
        f"resources: {s.nodes} node(s) x {s.tasks_per_node} task(s), {s.gpus_per_node} GPU(s)/node, "
        f"{s.cpus_per_task} CPU(s)/task, {s.mem_gb} GB/node, {s.timeout_min} min per attempt",
        f"stop signal: USR2 {s.signal_delay_s} s before the limit and at preemption; "
        f"requeue: preemptions always, time limits {s.max_timeouts} time(s)",
        f"trainer: {shlex.join(trainer_command(cfg, Path('<frozen config>')))}",
    ]
    if s.executor == "slurm":
        from submitit.slurm.slurm import _make_sbatch_string

        folder = job_folder(cfg)
        script = _make_sbatch_string(
            command=submitit_command(folder), folder=folder, **sbatch_parameters(cfg)
        )
        lines += ["", "# the batch script (sbatch)", script]
    return "\n".join(lines) + "\n"


def check_submittable(cfg: RunConfig) -> None:
    """Mistakes worth catching before a job waits in the queue."""
    if cfg.slurm.container:
        if not Path(cfg.slurm.container).exists():
            raise ConfigError(
                f"slurm.container: image {cfg.slurm.container!r} not found; build it (see Containerfile) "
                "or leave the key empty to run on the host."
            )
    elif not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(
            f"model.path: {cfg.model.path!r} is not a model directory (no config.json); point it at a "
            "directory saved with save_pretrained, readable from the compute nodes."
        )


def make_executor(cfg: RunConfig) -> Any:
    import submitit

    folder = job_folder(cfg)
    if cfg.slurm.executor == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=cfg.slurm.timeout_min,
            tasks_per_node=cfg.slurm.tasks_per_node,
            gpus_per_node=cfg.slurm.gpus_per_node,
            signal_delay_s=cfg.slurm.signal_delay_s,
        )
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=folder)
    except RuntimeError:
        raise ConfigError(
            "slurm.executor: 'slurm' needs the SLURM client commands (srun, sbatch) on PATH; run this on "
            "a login node, or set slurm.executor=local to run on this machine."
        ) from None
    executor.update_parameters(**sbatch_parameters(cfg))
    return executor


def submit(cfg: RunConfig, wait: bool = False, out: Callable[[str], None] = print, echo: bool = False) -> int:
    """Submit the run; with ``wait``, follow it (``echo``: and show the trainer's lines) and return 0 only
    when training finished."""
    cfg = absolute(cfg)
    check_submittable(cfg)
    folder = job_folder(cfg)
    frozen = folder / f"{cfg.name}.{datetime.now().strftime('%Y%m%dT%H%M%S%f')}.yaml"
    save_config(cfg, frozen)  # the job reads this, not the user's file, which may change while it waits
    job = make_executor(cfg).submit(TrainJob(str(frozen), cfg))
    paths = job.paths
    out(f"submitted job {job.job_id} ({cfg.slurm.executor}): run {cfg.run_dir}")
    out(f"  log:    {paths.stdout}")
    out(f"  errors: {paths.stderr}")
    follow = "squeue -j " + job.job_id if cfg.slurm.executor == "slurm" else f"tail -f {paths.stdout}"
    out(f"  follow: rlarith status {cfg.run_dir}   ({follow})")
    if not wait:
        return 0
    return watch(job, cfg, out, poll_s=0.5 if echo else 2.0, echo=echo)


def watch(
    job: Any, cfg: RunConfig, out: Callable[[str], None] = print, poll_s: float = 2.0, echo: bool = False
) -> int:
    """Print a line at every state change and every new attempt (with ``echo``, also the trainer's own
    lines as its log grows); 0 only when training finished."""
    state, seen, offset = "", 0, 0
    try:
        while True:
            done = job.done(force_check=True)
            new_state = job.state
            rows = attempts.merged(cfg.run_dir)
            for row in rows[seen:]:
                out(f"{iso_time()} attempt {row['attempt']} started on {row.get('host', '?')}")
            seen = len(rows)
            if new_state != state:
                out(f"{iso_time()} job {job.job_id}: {new_state}")
                state = new_state
            if echo and job.paths.stdout.is_file():
                with job.paths.stdout.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]  # whole lines only; the rest comes next time
                offset += len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    out(line)
            if done:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        if cfg.slurm.executor == "local":
            job.cancel(check=False)  # a local job would outlive this process
            out("interrupted: the local job was asked to stop (it saves first)")
        else:
            out(f"stopped watching; job {job.job_id} goes on (rlarith status {cfg.run_dir})")
        return 130
    try:
        out(f"{iso_time()} {job.results()[0]}")  # one result per task; rank 0's says it all
        return 0
    except Exception as err:  # submitit re-raises the job's error inside its own (with a traceback)
        text = str(err)
        reason = text.split("JobFailed: ", 1)[1].strip() if "JobFailed: " in text else text.strip()
        out(f"{iso_time()} job {job.job_id} did not finish the run: {reason}")
        return 1


# ------------------------------------------------------------------------------------------- job side


def trainer_command(cfg: RunConfig, config_path: Path) -> list[str]:
    """The trainer's command line: on the host, or inside ``apptainer exec`` with the run's folders bound."""
    if not cfg.slurm.container:
        return [sys.executable, "-m", "rlarith.cli", "train", "-c", str(config_path)]
    binds = {Path(cfg.runs_dir), config_path.parent, *map(Path, cfg.slurm.binds)}
    if Path(cfg.model.path).exists():
        binds.add(Path(cfg.model.path))
    if cfg.traces.dir:
        binds.add(Path(cfg.traces.dir).parent)
    if os.environ.get("SCRATCH"):
        binds.add(Path(os.environ["SCRATCH"]))
    runtime = os.environ.get("RLARITH_APPTAINER", "apptainer")  # tests put a stand-in here
    return [
        runtime,
        "exec",
        *(["--nv"] if cfg.slurm.gpus_per_node else []),
        *[arg for b in sorted(binds) for arg in ("--bind", str(b))],
        cfg.slurm.container,
        "rlarith",
        "train",
        "-c",
        str(config_path),
    ]


class Forwarder:
    """Signal handlers that pass USR2/TERM/INT on to the trainer and remember the first one."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.received: signal.Signals | None = None
        self.received_at: float | None = None

    def install(self) -> Forwarder:
        for sig in FORWARDED:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum), time.time()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def attach(self, child: subprocess.Popen) -> None:
        self.child = child
        if self.received is not None and child.poll() is None:  # arrived while the child was starting
            child.send_signal(self.received)


def _tee(stream: Any, sink: Any, tail: collections.deque[str]) -> None:
    """Copy the child's stderr to ours line by line, keeping the last lines for the job's error."""
    for raw in iter(stream.readline, b""):
        sink.buffer.write(raw)
        sink.flush()
        tail.append(raw.decode(errors="replace").rstrip())


def scontrol_job(job_id: str) -> dict[str, str]:
    """``scontrol show job -o``'s fields; empty when scontrol is missing or the job is unknown."""
    try:
        text = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", text))


def why_signalled(fields: dict[str, str], signalled_at: float, signal_delay_s: int) -> str:
    """``preempted``, ``timeout`` or ``requeued`` (anything else: scontrol requeue, scancel --signal).

    SLURM says so itself: a preempted job has a ``PreemptTime``; a job signalled for its time limit has its
    ``EndTime`` within the signal lead time (SLURM may signal up to a minute early).

    >>> why_signalled({"PreemptTime": "2026-11-26T10:00:00", "EndTime": "2026-11-26T10:00:15"}, 0, 90)
    'preempted'
    >>> end = datetime(2026, 11, 26, 11, 0).timestamp()
    >>> why_signalled({"PreemptTime": "None", "EndTime": "2026-11-26T11:00:00"}, end - 100, 90)
    'timeout'
    >>> why_signalled({"PreemptTime": "None", "EndTime": "2026-11-26T11:00:00"}, end - 3600, 90)
    'requeued'
    """
    if fields.get("PreemptTime", "None") not in ("None", "Unknown", ""):
        return "preempted"
    try:
        end = datetime.fromisoformat(fields["EndTime"]).timestamp()
    except (KeyError, ValueError):
        return "requeued"
    return "timeout" if end - signalled_at <= signal_delay_s + SLURM_SIGNAL_EARLY_S else "requeued"


def _latest_step(run_dir: Path) -> int | None:
    valid = valid_checkpoints(run_dir)
    return valid[-1][0] if valid else None


def _last_logged_step(run_dir: Path) -> int | None:
    path = run_dir / metrics.METRICS  # its tail only: --wait asks at every poll
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - 65536))
        lines = fh.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        match = re.search(r'"step": (\d+)', line)
        if match:
            return int(match.group(1))
    return None


class TrainJob:
    """The job driver: submitit pickles it at submission and calls it in every task of every attempt."""

    def __init__(self, config_path: str, cfg: RunConfig) -> None:
        self.config_path = config_path
        self.cfg = cfg

    def __call__(self) -> str:
        import submitit

        cfg, env_job = self.cfg, submitit.JobEnvironment()
        rank, run_dir = env_job.global_rank, cfg.run_dir
        slurm = cfg.slurm.executor == "slurm"
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        attempt = f"{env_job.job_id}.{restart}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if env_job.num_tasks > 1:
            dist = submitit.helpers.TorchDistributedEnvironment()
            env.update(
                MASTER_ADDR=dist.master_addr,
                MASTER_PORT=str(dist.master_port),
                RANK=str(dist.rank),
                WORLD_SIZE=str(dist.world_size),
                LOCAL_RANK=str(dist.local_rank),
                LOCAL_WORLD_SIZE=str(dist.local_world_size),
            )
            visible = env.get("CUDA_VISIBLE_DEVICES", "")
            if cfg.slurm.gpus_per_node and visible:  # one GPU per task, out of the node's GPUs
                env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[dist.local_rank]
        grace = partition_grace_s(cfg.slurm.partition) if slurm else None
        if grace is not None:
            env["RLARITH_GRACE_S"] = str(grace)
        if rank == 0:
            step_s, save_s = measured_times(run_dir)  # from earlier attempts, when there were any
            if step_s is not None and save_s is not None:
                status, detail = verdict(step_s, save_s, cfg.slurm.signal_delay_s, grace)
                if status != "OK":
                    print(f"rlarith: grace budget {status}: {detail}", file=sys.stderr, flush=True)
            resumed = _latest_step(run_dir)
            attempts.append(
                run_dir,
                attempts.Attempt(
                    "start",
                    attempt,
                    env_job.job_id,
                    host=socket.gethostname(),
                    restart=restart,
                    first_step=(resumed or 0) + 1,
                ),
            )

        forwarder = Forwarder().install()
        tail: collections.deque[str] = collections.deque(maxlen=20)
        command = trainer_command(cfg, Path(self.config_path))
        try:
            # On the host the trainer starts with the stop signals blocked (pending, not fatal) until its
            # handler is in place; a container runtime would pass the mask on to its own forwarding.
            block = None if cfg.slurm.container else block_stop_signals
            child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, preexec_fn=block)
        except OSError as err:  # e.g. no apptainer on this node
            tail.append(f"cannot start {command[0]}: {err}")
            rc = 127
        else:
            forwarder.attach(child)
            tee = threading.Thread(target=_tee, args=(child.stderr, sys.stderr, tail), daemon=True)
            tee.start()
            rc = child.wait()
            tee.join(timeout=10)

        if rc == 0:
            ended, detail = "finished", ""
        elif rc == EXIT_STOPPED or (forwarder.received is not None and (rc < 0 or rc > 128)):
            # Stopped after a save (75), or killed by a signal after ours (negative, or 128 + N through a
            # container runtime): either way the run resumes from its latest valid checkpoint.
            ended = "stopped"
            if slurm and forwarder.received_at is not None:
                ended = why_signalled(
                    scontrol_job(env_job.job_id), forwarder.received_at, cfg.slurm.signal_delay_s
                )
            detail = f"signal {forwarder.received.name}" if forwarder.received else "exit 75"
        else:
            ended, detail = "failed", "\n".join(tail)
        if (
            ended == "timeout"
            and attempts.count(run_dir, env_job.job_id, "timeout") >= cfg.slurm.max_timeouts
        ):
            ended = "timeout-limit"

        if rank == 0:
            attempts.append(
                run_dir,
                attempts.Attempt(
                    "end",
                    attempt,
                    env_job.job_id,
                    restart=restart,
                    last_step=_last_logged_step(run_dir),
                    checkpoint=_latest_step(run_dir),
                    ended=ended,
                    exit=rc,
                    signalled=iso_time(forwarder.received_at) if forwarder.received_at else None,
                    detail=detail,
                ),
            )
        if ended == "finished":
            return f"training finished: {run_dir} (checkpoint-{_latest_step(run_dir)})"
        if ended == "failed":
            raise JobFailed(
                f"the trainer exited with status {rc} (not requeued). Its last lines:\n" + "\n".join(tail)
            )
        if ended in ("stopped", "timeout-limit"):
            hint = (
                f"the time limit came {cfg.slurm.max_timeouts + 1} times (slurm.max_timeouts="
                f"{cfg.slurm.max_timeouts}): raise slurm.timeout_min or slurm.max_timeouts"
                if ended == "timeout-limit"
                else f"stopped on {detail}"
            )
            saved = _latest_step(run_dir)
            raise JobFailed(
                f"{hint}. {f'The run is saved at checkpoint-{saved}' if saved else 'Nothing was saved yet'}"
                " and resumes exactly: submit the same command again."
            )
        # preempted / timeout / requeued: rank 0 requeues the same job from the host; it resumes by itself.
        if rank == 0:
            result = subprocess.run(["scontrol", "requeue", env_job.job_id], capture_output=True, text=True)
            print(
                f"rlarith: {attempts.ENDINGS[ended]} (job {env_job.job_id}, attempt {attempt}"
                f"{'' if result.returncode == 0 else ', scontrol requeue: ' + result.stderr.strip()})",
                file=sys.stderr,
                flush=True,
            )
        # SystemExit, not an exception: submitit then writes no result, and the requeued job runs again.
        raise SystemExit(EXIT_STOPPED)
