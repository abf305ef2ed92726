"""``rlarith submit``: a run as a submitit job on SLURM (or this machine), and the driver that runs in it.

How a SLURM run survives preemption and time limits:

1. ``submit`` resolves the config (paths made absolute, written next to submitit's logs) and submits a
   ``TrainJob`` through submitit: ``sbatch --requeue --signal=USR2@<slurm.signal_delay_s>``, one task per
   rank, ``srun`` starting submitit's runner in each task.
2. In every task, ``TrainJob.__call__`` (the job driver, on the host) builds the rank's torch.distributed
   environment from the job, starts ``rlarith train`` as a child process (inside the image when
   ``slurm.container`` is set: ``rlarith.container``), forwards USR2/TERM/INT to it and waits. It replaces submitit's own USR2
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

from rlarith import attempts, container, endings, metrics, ranks
from rlarith.checkpoints import valid_checkpoints
from rlarith.config import ConfigError, RunConfig, save_config
from rlarith.grace import measured_times, partition_grace_s, verdict
from rlarith.preemption import EXIT_STOPPED, block_stop_signals
from rlarith.training.identity import ATTEMPT_ENV, iso_time, new_attempt_id

FORWARDED = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


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
        training=dataclasses.replace(  # a DeepSpeed JSON of the user's own (zero2/zero3 are package data)
            cfg.training,
            deepspeed=cfg.training.deepspeed
            if cfg.training.deepspeed in ("none", "zero2", "zero3")
            else fix(cfg.training.deepspeed),
        ),
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
        # One rank failing ends the step at once (its peers would wait in a collective for a dead rank).
        # srun restates --cpus-per-task: on SLURM 22.05-23.02 it does not inherit sbatch's, and under core
        # binding each rank would be pinned to one CPU.
        "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={s.cpus_per_task}"],
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
        f"trainer: {shlex.join(trainer_command(cfg, Path('<frozen config>'), {})[0])}",
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
        if container.kind(cfg) != "podman" and not Path(cfg.slurm.container).exists():  # podman: a name
            raise ConfigError(
                f"slurm.container: image {cfg.slurm.container!r} not found; build it (see Containerfile) "
                "or leave the key empty to run on the host."
            )
        for bind in cfg.slurm.binds:
            if not Path(bind.split(":")[0]).exists():
                raise ConfigError(
                    f"slurm.binds: {bind!r}: the host path does not exist; create it or remove the entry."
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
    resubmit = f"rlarith submit -c {shlex.quote(str(frozen))} --wait"
    return watch(job, cfg, out, poll_s=0.5 if echo else 2.0, echo=echo, resubmit=resubmit)


SLURM_POLL_MAX_S = 60.0
"""``--wait`` asks SLURM (sacct) at most this rarely while nothing changes in the run directory."""


def watch(
    job: Any,
    cfg: RunConfig,
    out: Callable[[str], None] = print,
    poll_s: float = 2.0,
    echo: bool = False,
    resubmit: str = "",
) -> int:
    """Print a line at every state change and every attempt's start and end (with ``echo``, also the
    trainer's own lines as its log grows); 0 only when training finished.

    The run directory (attempts.jsonl, the log) is read every ``poll_s``; SLURM is asked (sacct, through
    submitit) when something changed there and otherwise at growing intervals, up to ``SLURM_POLL_MAX_S``:
    a day-long job costs the controller a query a minute. A job that ends ``PREEMPTED`` (a preemption
    under ``PreemptMode=CANCEL`` that was not requeued) is an end, not a wait: submitit counts it as
    unfinished."""
    state, seen, ends, offset = "", 0, 0, 0
    slurm_every, next_slurm = poll_s, 0.0
    try:
        while True:
            rows = attempts.merged(cfg.run_dir)
            changed = False
            for row in rows[seen:]:
                out(f"{iso_time()} attempt {row['attempt']} started on {row.get('host', '?')}")
                changed = True
            seen = len(rows)
            for row in [r for r in rows if "end" in r][ends:]:
                words = attempts.ENDINGS.get(row.get("ended", ""), row.get("ended", "?"))
                out(f"{iso_time()} attempt {row['attempt']} ended: {words}")
                changed = True
            ends = sum("end" in r for r in rows)
            done = False
            now = time.monotonic()
            if changed or now >= next_slurm or job.paths.result_pickle.exists():
                done = job.done(force_check=True)
                # sacct's answer of the call above, not another call; a local job's state is its process's
                local = cfg.slurm.executor == "local"
                new_state = job.state if local else job.watcher.get_state(job.job_id, mode="cache")
                if new_state != state:
                    out(f"{iso_time()} job {job.job_id}: {new_state}")
                    state, changed = new_state, True
                slurm_every = poll_s if changed else min(SLURM_POLL_MAX_S, slurm_every * 2)
                next_slurm = now + slurm_every
                if not done and state == "PREEMPTED" and _preempted_for_good(job.job_id):
                    reason = (
                        _latest_reason(cfg.run_dir) or "the preemption's grace time ran out before a requeue"
                    )
                    out(f"{iso_time()} job {job.job_id} ended PREEMPTED and was not requeued: {reason}")
                    out(
                        f"resume it (it continues from its latest checkpoint): {resubmit or 'submit the same command again'}"
                    )
                    return 1
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
        reason = reason.split("\n\n-----", 1)[0].strip()  # submitit's own footer (where its logs are)
        recorded = _latest_reason(cfg.run_dir)
        if recorded and "JobFailed: " not in text:  # rank 0 was killed before it could say why
            reason = recorded
        out(f"{iso_time()} job {job.job_id} did not finish the run: {reason}")
        if resubmit:
            out(f"resume it once the cause is fixed (it continues from its latest checkpoint): {resubmit}")
        return 1


def _preempted_for_good(job_id: str) -> bool:
    """sacct said PREEMPTED: the controller confirms the job stays so (under ``PreemptMode=REQUEUE`` the
    state passes on to REQUEUED and PENDING), or no longer knows the job."""
    from rlarith.endings import scontrol_job

    return scontrol_job(job_id).get("JobState", "PREEMPTED") == "PREEMPTED"


def _latest_reason(run_dir: Path) -> str:
    """What the latest attempt's records say ended it, in words ('' when nothing is recorded yet)."""
    rows = attempts.merged(run_dir)
    if not rows:
        return ""
    row = rows[-1]
    if "end" in row:
        words = attempts.ENDINGS.get(row.get("ended", ""), row.get("ended", ""))
        said = "; ".join(x for x in (row.get("reason", ""), row.get("detail", "").strip()) if x)
        return f"attempt {row['attempt']}: {words}" + (f" ({said})" if said else "")
    failures = row.get("ranks") or []
    if failures:
        return f"attempt {row['attempt']}: " + attempts.failure_text(failures[0])
    return ""


# ------------------------------------------------------------------------------------------- job side


def trainer_command(
    cfg: RunConfig, config_path: Path, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The trainer's command line and environment: on the host, or inside the container image
    (``slurm.container``, run by ``slurm.container_runtime``; rlarith.container)."""
    env = dict(os.environ) if env is None else env
    if not cfg.slurm.container:
        return [sys.executable, "-m", "rlarith.cli", "train", "-c", str(config_path)], env
    return container.command(cfg, ["train", "-c", str(config_path)], env, config_path)


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


def _tee(stream: Any, sink: Any, tail: collections.deque[str], failing: threading.Event) -> None:
    """Copy the child's stderr to ours line by line, keeping the last lines for the job's error;
    ``failing`` is set once the child prints a traceback (it is failing, whatever kills it next)."""
    for raw in iter(stream.readline, b""):
        sink.buffer.write(raw)
        sink.flush()
        line = raw.decode(errors="replace").rstrip()
        if "Traceback (most recent call last)" in line:
            failing.set()
        tail.append(line)


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
        # First thing: a stop signal during start-up (scontrol, bookkeeping) is kept for the trainer. Left
        # to submitit, a USR2 would requeue from inside its handler and a TERM would be ignored.
        forwarder = Forwarder().install()
        import submitit

        cfg, env_job = self.cfg, submitit.JobEnvironment()
        rank, run_dir = env_job.global_rank, cfg.run_dir
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        # One id per start, the trainer's too: SLURM counts restarts; a local job id is only a pid.
        attempt = new_attempt_id(env_job.job_id, restart if cfg.slurm.executor == "slurm" else None)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{ATTEMPT_ENV: attempt})
        if env_job.num_tasks > 1:  # the rendezvous, ranks and GPUs: rlarith.ranks
            try:
                dist, notes = ranks.rank_env(
                    os.environ, job_id=env_job.job_id, restart=restart, rank=rank,
                    world_size=env_job.num_tasks, local_rank=env_job.local_rank,
                    local_world_size=env_job.num_tasks // env_job.num_nodes, hostnames=list(env_job.hostnames),
                    node=env_job.node, gpus=cfg.slurm.gpus_per_node > 0,
                )  # fmt: skip
            except ranks.RankEnvError as err:
                raise JobFailed(f"{err} (not requeued)") from None
            env.update(dist)
            for note in notes if rank == 0 else []:
                print(f"rlarith: {note}", file=sys.stderr, flush=True)
        env[LOCK_WAIT_ENV] = str(cfg.slurm.lock_wait_s)
        resumed = _latest_step(run_dir)
        if cfg.slurm.container:  # a runtime refuses a bind source that does not exist (apptainer: exit 255)
            container.create_bind_sources(cfg, Path(self.config_path))
        if rank == 0:
            self._start(env, env_job.job_id, attempt, restart, resumed)
            if cfg.slurm.container:
                self._check_image(env, env_job.job_id, attempt, restart, resumed)

        tail: collections.deque[str] = collections.deque(maxlen=20)
        failing = threading.Event()
        command, start_env = trainer_command(cfg, Path(self.config_path), env)
        try:
            # On the host the trainer starts with the stop signals blocked (pending, not fatal) until its
            # handler is in place; a container runtime would pass the mask on to its own forwarding.
            block = None if cfg.slurm.container else block_stop_signals
            child = subprocess.Popen(command, env=start_env, stderr=subprocess.PIPE, preexec_fn=block)
        except OSError as err:  # e.g. no apptainer on this node
            tail.append(f"cannot start {command[0]}: {err}")
            rc = 127
        else:
            forwarder.attach(child)
            tee = threading.Thread(target=_tee, args=(child.stderr, sys.stderr, tail, failing), daemon=True)
            tee.start()
            rc = _wait(child, forwarder, run_dir, attempt)
            tee.join(timeout=10)

        # Stopped after a save (75), or killed by a signal after ours (negative, or 128 + N through a
        # container runtime) unless it was already failing: SLURM ending a job whose collective just
        # timed out (a node failure) kills a trainer that is printing its error.
        stopped = rc == EXIT_STOPPED or (
            forwarder.received is not None and (rc < 0 or rc > 128) and not failing.is_set()
        )
        if rc != 0 and not stopped:
            # Every failed rank says so itself: rank 0's own error may only be the peer's disappearance.
            attempts.append(
                run_dir,
                attempts.Attempt(
                    "rank", attempt, env_job.job_id, host=socket.gethostname(), restart=restart,
                    rank=rank, exit=rc, detail="\n".join(tail),
                ),
            )  # fmt: skip
        if rank != 0:
            if rc == 0:
                return f"training finished: {run_dir}"
            if not stopped:
                raise JobFailed(f"{_rank_text(rank, rc, tail)} (rank 0 decides what happens next)")
            raise SystemExit(EXIT_STOPPED)  # rank 0 explains and requeues
        return self._end(rc, stopped, forwarder, tail, env_job.job_id, attempt, restart, resumed or 0)

    def _start(
        self, env: dict[str, str], job_id: str, attempt: str, restart: int, resumed: int | None
    ) -> None:
        """Rank 0 at the start of an attempt: the grace check and the attempt's start record; a restart
        SLURM made after a failure rlarith did not requeue ends here (``endings.before_restart``)."""
        cfg, run_dir = self.cfg, self.cfg.run_dir
        grace = (
            partition_grace_s(cfg.slurm.partition, cfg.slurm.qos) if cfg.slurm.executor == "slurm" else None
        )
        if grace is not None:
            env["RLARITH_GRACE_S"] = str(grace)
        step_s, save_s = measured_times(run_dir)  # from earlier attempts, when there were any
        if step_s is not None and save_s is not None:
            status, detail = verdict(step_s, save_s, cfg.slurm.signal_delay_s, grace)
            if status != "OK":
                print(f"rlarith: grace budget {status}: {detail}", file=sys.stderr, flush=True)
        refused = endings.before_restart(run_dir, job_id, restart, resumed, cfg.slurm.max_failures)
        attempts.append(
            run_dir,
            attempts.Attempt(
                "start", attempt, job_id, host=socket.gethostname(), restart=restart,
                first_step=(resumed or 0) + 1,
            ),
        )  # fmt: skip
        if refused:
            attempts.append(
                run_dir,
                attempts.Attempt("end", attempt, job_id, restart=restart, checkpoint=resumed, ended="failed",
                                 reason=refused),
            )  # fmt: skip
            raise JobFailed(f"{refused}. {_resume_hint(resumed)}")

    def _check_image(
        self, env: dict[str, str], job_id: str, attempt: str, restart: int, resumed: int | None
    ) -> None:
        """Rank 0, before the trainer: the image's rlarith must read the config as this one wrote it; else
        the job fails once, saying so (not every attempt on a strict-parse error)."""
        mismatch = container.version_mismatch(self.cfg, env)
        if mismatch:
            attempts.append(
                self.cfg.run_dir,
                attempts.Attempt("end", attempt, job_id, restart=restart, checkpoint=resumed, ended="failed",
                                 reason="image version", detail=mismatch),
            )  # fmt: skip
            raise JobFailed(mismatch)

    def _end(
        self,
        rc: int,
        stopped: bool,
        forwarder: Forwarder,
        tail: collections.deque[str],
        job_id: str,
        attempt: str,
        restart: int,
        resumed: int,
    ) -> str:
        """Rank 0 once its trainer exited: why the attempt ended, the requeue, the end record, the result."""
        cfg, run_dir = self.cfg, self.cfg.run_dir
        slurm = cfg.slurm.executor == "slurm"
        failures = attempts.rank_failures(run_dir, attempt)
        if rc != 0 and not stopped and len(failures) < 2 and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            # Our trainer failed: give a peer whose failure caused ours a moment to say so.
            deadline = time.monotonic() + PEER_REPORT_S
            while len(failures) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
                failures = attempts.rank_failures(run_dir, attempt)
        checkpoint = _latest_step(run_dir)
        requeue, reason, detail = False, "", ""
        fields: dict[str, str] = {}
        if rc == 0:
            ended = "finished"
        elif failures:  # a rank failed (ours, or a peer's, which may have got us killed)
            first = failures[0]
            silent = sorted(
                set(range(int(os.environ.get("SLURM_NTASKS", "1")))) - {f.get("rank") for f in failures}
            )
            quiet = (
                f" (rank {', '.join(map(str, silent))} recorded nothing: its node may be gone)"
                if silent
                else ""
            )
            detail = attempts.failure_text(first) + quiet + "\n" + (first.get("detail") or "")
            requeue, reason = endings.after_failure(
                run_dir,
                job_id,
                resumed,
                checkpoint,
                cfg.slurm.max_failures,
                tuple(f.get("exit") for f in failures),
            )
            requeue = requeue and slurm
            ended = "failed-requeued" if requeue else "failed"
        elif not stopped:  # failed, and the rank record could not be read back
            ended, detail = "failed", _rank_text(0, rc, tail)
        else:
            ended = "stopped"
            if slurm and forwarder.received_at is not None:
                fields = endings.scontrol_job(job_id)
                ended = endings.why_signalled(fields, forwarder.received_at, cfg.slurm.signal_delay_s)
            detail = f"signal {forwarder.received.name}" if forwarder.received else "exit 75"
            if ended == "timeout" and attempts.count(run_dir, job_id, "timeout") >= cfg.slurm.max_timeouts:
                ended = "timeout-limit"
            requeue = ended in ("preempted", "timeout", "requeued")
        if requeue and not failures and endings.requeued_by_slurm(fields):
            reason = "SLURM requeued the job itself (scontrol requeue from outside)"
        elif requeue:
            said = endings.requeue(job_id)
            if said:  # the record tells the truth: nothing will restart this job
                reason = (
                    f"{reason}; scontrol requeue failed: {said}"
                    if reason
                    else f"scontrol requeue failed: {said}"
                )
                ended = "failed" if ended == "failed-requeued" else "requeue-failed"
                requeue = False
        attempts.append(
            run_dir,
            attempts.Attempt(
                "end", attempt, job_id, restart=restart, last_step=_last_logged_step(run_dir),
                checkpoint=checkpoint, ended=ended, exit=rc,
                signalled=iso_time(forwarder.received_at) if forwarder.received_at else None,
                rank=failures[0].get("rank") if failures and rc != 0 else None, reason=reason, detail=detail,
            ),
        )  # fmt: skip
        if ended == "finished":
            return f"training finished: {run_dir} (checkpoint-{checkpoint})"
        if requeue:
            print(f"rlarith: {attempts.ENDINGS[ended]} (job {job_id}, attempt {attempt}{'; ' + reason if reason else ''})",
                  file=sys.stderr, flush=True)  # fmt: skip
            # SystemExit, not an exception: submitit then writes no result, and the requeued job runs again.
            raise SystemExit(EXIT_STOPPED)
        if ended == "failed" and slurm:
            endings.no_requeue(job_id)  # SLURM's own requeue (NODE_FAIL, JobRequeue=1) would run it again
        if ended == "failed":
            raise JobFailed(f"{detail.strip()}\n({reason or 'not requeued'}). {_resume_hint(checkpoint)}")
        hint = {
            "timeout-limit": f"the time limit came {cfg.slurm.max_timeouts + 1} times (slurm.max_timeouts="
            f"{cfg.slurm.max_timeouts}): raise slurm.timeout_min or slurm.max_timeouts",
            "cancelled": "cancelled (scancel): saved, not requeued",
            "requeue-failed": f"stopped on {detail} and saved, but {reason}",
        }.get(ended, f"stopped on {detail}")
        raise JobFailed(f"{hint}. {_resume_hint(checkpoint)}")


PEER_REPORT_S = 3.0
"""How long rank 0, its trainer failed, waits for another rank's record of an earlier failure."""

LOCK_WAIT_ENV = "RLARITH_LOCK_WAIT_S"
"""How long a restart's trainer waits for a run lock held by an earlier attempt of its job (rlarith.runlock)."""


def _rank_text(rank: int, rc: int, tail: collections.deque[str]) -> str:
    head = attempts.failure_text({"rank": rank, "host": socket.gethostname(), "exit": rc})
    return head + ". Its last lines:\n" + "\n".join(tail)


def _resume_hint(checkpoint: int | None) -> str:
    if not checkpoint:
        return "Nothing was saved yet: the same command again starts it over."
    return f"The run is saved at checkpoint-{checkpoint} and resumes exactly: submit the same command again."


def _wait(child: subprocess.Popen, forwarder: Forwarder, run_dir: Path, attempt: str) -> int:
    """The trainer's exit status. After a stop signal, a peer rank's recorded failure means the signal is
    SLURM ending the step (``--kill-on-bad-exit``): no save can succeed without that peer, so the trainer
    is killed at once rather than at SLURM's KillWait, leaving time to record why."""
    while True:
        try:
            return child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if forwarder.received is not None and attempts.rank_failures(run_dir, attempt):
            child.kill()
