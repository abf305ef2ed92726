"""A save made complete: after the Trainer wrote ``checkpoint-<step>`` into the staging folder (every rank
its part), rank 0 seals it into the run directory with the save policy's state, prunes, and reports it."""

from __future__ import annotations

import os
import time
from typing import Any

from rlarith.checkpoints import STATE_FILE, checkpoint_path, prune, seal, staging_dir
from rlarith.config import flat
from rlarith.grace import verdict
from rlarith.training.context import RunContext
from rlarith.training.logs import FILE_ONLY, log


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
    """Called on every rank right after the Trainer's save (``on_save``), before training goes on or
    stops: the checkpoint is sealed (or refused) before the stop-and-exit path returns."""
    step, started = trainer.state.global_step, run.save_started
    run.policy.record_save(step, run.pending_reward, run.pending_reasons, time.time() - started)
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        final = checkpoint_path(run.cfg.run_dir, step)
        seal(
            staging_dir(run.cfg.run_dir) / f"checkpoint-{step}",
            final,
            {
                **run.policy.state_dict(),
                "attempt": run.attempt.id,
                "run_id": run.run_id,
                "config": flat(run.cfg),  # names the changed keys should config.yaml go missing
                "step": step,
            },
            required=checkpoint_contents(step, trainer.args.world_size, trainer.is_deepspeed_enabled),
        )
        report = prune(run.cfg.run_dir, run.policy.best_step, run.cfg.checkpoints.keep_best, verified=step)
        log.info("%s", run.policy.report(step, run.pending_reasons), extra=FILE_ONLY)
        log.info("%s", report, extra=FILE_ONLY)
        # The screen gets one line per save; the reports above are in logs/rank<r>.log.
        removed = ", ".join(path.name for path, _ in report.removed)
        log.info(
            "%s (%.1f s%s)",
            run.policy.summary(step, run.pending_reasons),
            time.time() - started,
            f"; removed {removed}" if removed else "",
        )
    run.policy.add_save_time(time.time() - started - run.policy.last_save_s)
    if trainer.accelerator.is_main_process and not run.grace_checked:
        run.grace_checked = True
        grace = os.environ.get("RLARITH_GRACE_S")  # set by the job driver under SLURM
        status, detail = verdict(
            run.step_s,
            time.time() - started,
            run.cfg.slurm.signal_delay_s,
            int(grace) if grace else None,
        )
        if status != "OK":
            log.warning("grace budget %s: %s", status, detail)
    trainer.accelerator.wait_for_everyone()
