"""GRPO on the arithmetic positive control, on TRL's GRPOTrainer (optionally with DeepSpeed).

The algorithm (GRPO, Shao et al. 2024, "DeepSeekMath"): for every problem sample a group of G completions,
score each with the reward components (rlarith.rewards), take the advantage of a completion as its reward
minus the group mean (divided by the group std), and push up the log-probability of above-average
completions with a clipped policy-gradient loss.

How this run departs from the paper (all TRL settings, set from the config):
- no KL penalty and no reference model by default (``training.beta = 0``), as in DAPO / Dr. GRPO;
- token-level loss normalisation (``loss_type = "dapo"``);
- a constant learning rate (after optional warmup): the notebook removed the decay;
- no chain of thought: completions are a handful of tokens and the prompt asks for the number alone.

What this package adds around TRL (rlarith/training/__init__.py lists its files):
- problems come from ``rlarith.data`` in a fixed, seeded order (TRL's shuffle is off), so the data
  position at step S is a pure function of S and resume needs no data state;
- the notebook's checkpoint policy (``rlarith.save_policy``, ``rlarith.checkpoints``): saves on a schedule, on a reward threshold and
  on a new best, only at generation boundaries, written to a staging folder and sealed complete, then
  pruned to first / second-to-last / latest (+ best); written by a background thread from a copy in host
  memory (``rlarith.training.async_save``), except a stop's save and the final one;
- every start is a resume from the latest valid checkpoint of the run directory;
- SIGTERM / SIGUSR2 only raise a flag (``rlarith.preemption``); at the next step boundary all ranks agree,
  save, seal their traces and exit with ``EXIT_STOPPED`` (75) so a wrapper requeues the job;
- per-sample traces of every step (``rlarith.traces``) and per-step metrics with ISO timestamps in
  ``metrics.jsonl`` and TensorBoard.

Launch:
    rlarith train -c configs/default.yaml [key=value ...]                   # one process, CPU or one GPU
    torchrun --nproc_per_node 2 -m rlarith.cli train -c configs/default.yaml training.deepspeed=zero2
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any

from rlarith import metrics as metrics_file
from rlarith.checkpoints import (
    clean_staging,
    latest_valid,
    latest_verified,
    load_policy_state,
    resumes_from,
    step_of,
)
from rlarith.config import RUN_CONFIG, ConfigDamaged, RunConfig, flat, load_run_config, save_config
from rlarith.data import TrainProblems, make_task
from rlarith.durable import StorageError, os_error, storage_error, storage_errors
from rlarith.preemption import EXIT_STOPPED, StopRequest, agree
from rlarith.quiet import expect_tied_keys, warn_once
from rlarith.runlock import RunLock
from rlarith.training.async_save import BackgroundWriter, HostBuffers
from rlarith.training.callbacks import forced_learning_rate, make_callbacks
from rlarith.training.context import RunContext
from rlarith.training.grpo_config import (
    build_dataset,
    deepspeed_config,
    grpo_config,
    reward_functions,
    start_process_group,
)
from rlarith.training.identity import Attempt, global_rank, iso_time
from rlarith.training.logs import StepFilter, log, log_to_file, setup_logging
from rlarith.training.preflight import (
    FORCED_RECORD,
    ForcedChange,
    check_batch,
    check_model_path,
    check_run_dir,
    check_trace_dir,
    record_forced,
)
from rlarith.training.trainer import make_trainer_class


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig, force: bool = False, stop: StopRequest | None = None) -> int:
    """Run (or resume) training; returns the process exit status: 0 finished, ``EXIT_STOPPED`` stopped
    after a full save (requeue me), anything else failed. ``stop``: a handler the caller installed
    already (``rlarith train`` does, before its heavy imports); otherwise one is installed here."""
    step_filter = setup_logging()
    own = stop is None
    stop = StopRequest().install() if stop is None else stop  # a signal during start-up stops, not kills
    lock = RunLock(cfg.run_dir)
    try:
        return _train(cfg, force, stop, step_filter, lock)
    finally:
        lock.release()
        if own:
            stop.uninstall()


def _train(cfg: RunConfig, force: bool, stop: StopRequest, step_filter: StepFilter, lock: RunLock) -> int:
    rank = global_rank()

    # Cheap checks first: no model is loaded before the config, paths and data are known to be good.
    check_model_path(cfg)
    forced = check_run_dir(cfg, force)
    check_trace_dir(cfg)
    lock.acquire(rank)  # one writer per run directory, before anything in it is written
    logs = cfg.run_dir / "logs" / f"rank{rank}.log"
    with storage_errors("Opening the run's log", logs, lambda: resumes_from(cfg.run_dir)):
        log_to_file(logs, step_filter)
    ds_config = deepspeed_config(cfg)
    task = make_task(cfg.task)
    stream = TrainProblems(task, cfg.data, cfg.training.seed)
    stream.check_capacity(cfg.training.max_steps * cfg.training.prompts_per_step)
    if ds_config and "RANK" not in os.environ:
        # DeepSpeed wants a process group even for one process (else it looks for mpi4py).
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = check_batch(cfg, world_size)
    if world_size > 1:  # a peer that vanishes fails a collective in collective_timeout_s, not 30 min
        start_process_group(cfg.training.collective_timeout_s)
    if stop.requested and world_size == 1:  # several ranks agree at a step boundary instead
        return _stopped_before_training(stop)
    attempt = Attempt.current()  # rank 0's is every rank's (broadcast below)
    if rank == 0:
        with storage_errors("Preparing the run directory", cfg.run_dir, lambda: resumes_from(cfg.run_dir)):
            _prepare_run_dir(cfg, forced, attempt)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    warn_once()  # transformers' FutureWarnings would otherwise repeat at every step
    hf_logging.disable_progress_bar()  # one line per step is ours; tqdm bars would interleave with it
    seed_everything(cfg.training.seed)
    run = RunContext(cfg, attempt, stop)

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Weights stay float32 (the optimizer's master copy); bf16/fp16 is autocast compute. Pure-bf16
    # weights would lose small AdamW updates to rounding.
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    expect_tied_keys(model)  # tied lm_head.weight is never saved; "missing" on resume is expected

    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(cfg.run_dir / "tensorboard"))
    args = grpo_config(cfg, per_device, ds_config, run.weights)
    funcs = reward_functions(cfg, run.rewards)
    trainer = make_trainer_class()(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=build_dataset(cfg, stream),
        processing_class=tokenizer,
    )
    trainer.run = run
    run.buffers, run.writer = HostBuffers(), BackgroundWriter(rank, world_size)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; Metrics prints timestamped lines
    for callback in make_callbacks(run, trainer):
        trainer.add_callback(callback)
    trainer.add_callback(forced_learning_rate(cfg.training.learning_rate))
    step_filter.trainer = trainer
    trainer.accelerator.wait_for_everyone()  # rank 0's clean_staging is done: every rank sees the same checkpoints
    if world_size > 1:  # one attempt id for all ranks: rank 0's (local pids differ per rank)
        from accelerate.utils import broadcast_object_list

        attempt = run.attempt = broadcast_object_list([attempt])[0]
    resume = latest_valid(cfg.run_dir)
    if resume is not None:
        run.policy.load_state_dict(load_policy_state(resume))
    if cfg.traces.enabled:
        from rlarith.traces import TraceWriter, trace_gaps

        run.traces = TraceWriter(
            cfg.trace_dir,
            run_id=run.run_id,
            rank=rank,
            attempt=attempt.id,
            attempt_seq=attempt.seq,
            cfg=cfg.traces,
            resume_step=step_of(resume) if resume else 0,  # earlier attempts' later steps are superseded
            run_dir=cfg.run_dir,  # the folder must belong to this run directory (rlarith.traces.owner)
        )
        if rank == 0 and resume is not None:  # steps trained but not traced (purged, lost): said, not hidden
            every = cfg.training.steps_per_generation * cfg.training.num_iterations
            gaps = trace_gaps(cfg.trace_dir, cfg.run_dir, every)
            if gaps:
                log.warning("%s; training goes on, recording its new steps", gaps)

    log.info(
        "run %s, attempt %s, %d rank(s), %s",
        run.run_id,
        attempt.id,
        world_size,
        f"resuming from {resume}" if resume else "starting from the model",
    )
    if agree(stop.requested, trainer.accelerator.device):  # a signal while loading: nothing new to save
        if run.traces is not None:
            run.traces.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return _stopped_before_training(stop)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        run.writer.wait()  # the final save is synchronous; this only surfaces an earlier write's error
    except BaseException as err:
        # The first error is the one reported; what else fails on the way out is a line each. A second
        # Ctrl-C (KeyboardInterrupt) aborts: it does not wait for a background write.
        _wind_down(run, wait_for_writer=isinstance(err, Exception))
        cause = None if isinstance(err, StorageError) else os_error(err)
        if cause is not None:  # a write not guarded where it is made (TensorBoard's, a library's)
            step = trainer.state.global_step
            raise storage_error(
                f"Training at step {step}", cause.filename, cause, resumes_from(cfg.run_dir)
            ) from err
        raise
    finally:
        if torch.distributed.is_initialized():  # DeepSpeed/DDP: leave no NCCL/gloo resources behind
            torch.distributed.destroy_process_group()
    if run.traces is not None:
        with storage_errors("Closing the traces", cfg.trace_dir, lambda: resumes_from(cfg.run_dir)):
            run.traces.close()
    if run.stopped and trainer.state.global_step < trainer.state.max_steps:
        log.info(
            "stopped at step %d after a full save; exit %d asks for a requeue",
            trainer.state.global_step,
            EXIT_STOPPED,
        )
        return EXIT_STOPPED
    if run.stopped or stop.requested:  # it came during the final step (or after): there is nothing left to do
        log.info("a stop request came during the final step; training is finished, so exit 0, not a requeue")
    log.info("finished at step %d", trainer.state.global_step)
    return 0


def _wind_down(run: RunContext, wait_for_writer: bool) -> None:
    """After training failed: let a background write in flight finish (it may still seal a checkpoint),
    and close the traces; an error in either is said in one line, so it never hides the first one."""
    steps = [("the background write", run.writer.wait)] if wait_for_writer else []
    if run.traces is not None:
        steps.append(("closing the traces", run.traces.close))
    for what, call in steps:
        try:
            call()
        except Exception as err:  # reported; the first error goes on
            log.warning("also failed on the way out: %s: %s", what, (str(err) or repr(err)).splitlines()[0])


def _prepare_run_dir(cfg: RunConfig, forced: ForcedChange | None, attempt: Attempt) -> None:
    """Rank 0, under the run lock, before any rank looks for a checkpoint: the config's record, leftovers
    of interrupted saves removed, damaged checkpoints moved aside, the metrics of re-run steps set aside."""
    saved = cfg.run_dir / RUN_CONFIG
    if saved.exists() and _saved_config(cfg.run_dir) != flat(cfg):  # keep the record of earlier attempts
        saved.rename(saved.with_name(f"config.{iso_time().replace(':', '')}.yaml"))
    save_config(cfg, saved)
    if forced is not None:
        record_forced(cfg.run_dir, forced, attempt.id)
        log.info("resuming with --force; changed: %s (recorded in %s)", forced, FORCED_RECORD)
    for path in clean_staging(cfg.run_dir):
        log.info("removed the leftover of an interrupted save: %s", path)
    found = latest_verified(cfg.run_dir)  # rank 0 moves damaged ones aside before any rank looks
    for moved in found.moved:
        log.warning("%s", moved)
    if found.verified is not None:
        v = found.verified
        log.info(
            "verified %s: %d files, %.1f MiB, %s in %.2f s",
            found.checkpoint.name,
            v.files,
            v.bytes / 2**20,
            "checksums" if v.checksums else "sizes only (sealed before checksums)",
            v.seconds,
        )
    resumed_step = (step_of(found.checkpoint) or 0) if found.checkpoint else 0
    lost = metrics_file.missing_steps(cfg.run_dir, resumed_step, cfg.training.logging_steps)
    if lost:  # said, never silent: the checkpoint covers steps whose metrics are gone
        log.warning(
            "%s has no records of step(s) %s, which %s covers: lost in a crash or removed; training goes on, "
            "their metrics stay missing",
            metrics_file.METRICS,
            metrics_file.steps_text(lost),
            found.checkpoint.name,
        )
    superseded = metrics_file.start_attempt(cfg.run_dir, attempt.id, attempt.seq, resumed_step)
    if superseded:
        log.info(
            "%d metrics records of steps after %d (to be re-run) moved to %s",
            superseded,
            resumed_step,
            metrics_file.SUPERSEDED,
        )


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The flat config of ``<run>/config.yaml``; None when it is damaged (preflight checked this start
    against the checkpoint's copy instead), said in the log."""
    try:
        return flat(load_run_config(run_dir))
    except ConfigDamaged as err:
        log.warning("%s %s: set aside, and written again from this start's config", err.path, err.why)
        return None


def _stopped_before_training(stop: StopRequest) -> int:
    name = stop.received.name if stop.received else "a stop signal"
    log.info(
        "received %s before training began: nothing new to save (the run is as its latest checkpoint left "
        "it); exit %d asks for a requeue",
        name,
        EXIT_STOPPED,
    )
    return EXIT_STOPPED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
