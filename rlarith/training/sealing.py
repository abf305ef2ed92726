"""A save made complete: after the Trainer wrote ``checkpoint-<step>`` into the staging folder (every rank
its part; in the background for an overlapped save, rlarith.training.async_save), rank 0 seals it into the
run directory with the save policy's state, prunes, and reports it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rlarith import metrics
from rlarith.checkpoints import (
    STATE_FILE,
    checkpoint_path,
    intact_after_failed_save,
    prune,
    seal,
    staging_dir,
    step_of,
)
from rlarith.config import flat
from rlarith.durable import storage_errors
from rlarith.grace import verdict
from rlarith.training.context import RunContext
from rlarith.training.logs import FILE_ONLY, log, sync_log_files


def checkpoint_contents(step: int, world_size: int, deepspeed: bool) -> list[Any]:
    """What a checkpoint must hold to resume exactly (``seal``'s ``required``: a pattern, or a list of
    alternatives): weights, optimizer and scheduler (or DeepSpeed's shards of every rank), the RNG state of
    every rank, trainer and policy state.

    >>> checkpoint_contents(4, 2, True)[3:]
    ['rng_state_0.pth', 'rng_state_1.pth', 'global_step4/*zero_pp_rank_0_*optim_states.pt', 'global_step4/*zero_pp_rank_1_*optim_states.pt']
    """
    weights = ["model.safetensors", "model.safetensors.index.json", f"global_step{step}/*model_states.pt"]
    required: list[Any] = ["trainer_state.json", STATE_FILE, weights]
    required += ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
    if deepspeed:
        required += [f"global_step{step}/*zero_pp_rank_{r}_*optim_states.pt" for r in range(world_size)]
    else:
        required += ["optimizer.pt", "scheduler.pt"]
    return required


def seal_save(run: RunContext, trainer: Any) -> None:
    """Called on every rank right after the Trainer's save (``on_save``). A synchronous save is sealed
    before this returns (before training goes on or stops); an overlapped one (``run.snapshot`` set by the
    trainer's ``_save_checkpoint``) is handed to the background writer, which seals it once written."""
    if run.traces is not None:  # the traces up to this step survive a crash before the checkpoint can
        run.traces.sync()
    step, started = trainer.state.global_step, run.save_started
    main = trainer.accelerator.is_main_process
    snapshot, run.snapshot = run.snapshot, None
    # Taken now, for the seal that may come later: the policy moves on with the next steps.
    run.policy.record_save(step, run.pending_reward, run.pending_reasons, time.time() - started)
    sealing = Sealing(
        folder=staging_dir(run.cfg.run_dir) / f"checkpoint-{step}",
        final=checkpoint_path(run.cfg.run_dir, step),
        state={
            **run.policy.state_dict(),
            "attempt": run.attempt.id,
            "run_id": run.run_id,
            "config": flat(run.cfg),  # names the changed keys should config.yaml go missing
            "step": step,
        },
        required=checkpoint_contents(step, trainer.args.world_size, trainer.is_deepspeed_enabled),
        best_step=run.policy.best_step,
        summary=run.policy.summary(step, run.pending_reasons),
        report=run.policy.report(step, run.pending_reasons),
        stall_s=time.time() - started,
    )
    if snapshot is not None:
        done = partial(_seal_and_report, run, sealing) if main else None
        run.writer.submit(snapshot, sealing.folder, done)
        return
    trainer.accelerator.wait_for_everyone()  # every rank's files are written
    if main:
        _seal_and_report(run, sealing, None)
    run.policy.add_save_time(time.time() - started - run.policy.last_save_s)
    trainer.accelerator.wait_for_everyone()


@dataclass(frozen=True)
class Sealing:
    """What rank 0 needs to seal one save, fixed when the save was made."""

    folder: Path
    final: Path
    state: dict[str, Any]
    required: list[Any]
    best_step: int | None
    summary: str
    report: str
    stall_s: float
    """Seconds the training stood still for this save (all of it, for a synchronous save)."""


def _seal_and_report(
    run: RunContext, sealing: Sealing, write_s: float | None, known: dict[str, dict] | None = None
) -> None:
    """Rank 0: seal, prune, report in the run's log and on screen, and judge the grace budget after the
    attempt's first save. ``write_s``: how long the background write took (None: the save was synchronous);
    ``known``: the checksums it took as it wrote."""
    started = time.time()
    step, run_dir = step_of(sealing.final), run.cfg.run_dir
    with storage_errors(
        f"Sealing checkpoint-{step}", sealing.folder, lambda: intact_after_failed_save(run_dir, step)
    ):
        # The run's own records first: a valid checkpoint never covers steps whose metrics a crash can lose.
        metrics.sync(run_dir)
        sync_log_files()
        seal(sealing.folder, sealing.final, sealing.state, required=sealing.required, known=known)
    report = prune(
        run.cfg.run_dir, sealing.best_step, run.cfg.checkpoints.keep_best, verified=step_of(sealing.final)
    )
    log.info("%s", sealing.report, extra=FILE_ONLY)
    log.info("%s", report, extra=FILE_ONLY)
    # The screen gets one line per save; the reports above are in logs/rank<r>.log.
    removed = ", ".join(path.name for path, _ in report.removed)
    total = sealing.stall_s + (write_s or 0.0) + (time.time() - started)
    overlapped = (
        f"{total:.1f} s" if write_s is None else f"{sealing.stall_s:.1f} s stall, {total:.1f} s in all"
    )
    log.info("%s (%s%s)", sealing.summary, overlapped, f"; removed {removed}" if removed else "")
    if not run.grace_checked:  # a stop's save is synchronous: judge the grace with a whole save's time
        run.grace_checked = True
        grace = os.environ.get("RLARITH_GRACE_S")  # set by the job driver under SLURM
        status, detail = verdict(
            run.step_s, total, run.cfg.slurm.signal_delay_s, int(grace) if grace else None
        )
        if status != "OK":
            log.warning("grace budget %s: %s", status, detail)
