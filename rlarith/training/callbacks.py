"""The Trainer callbacks: at each step boundary a stop request and the save policy (and, right after a
save, its sealing); every logged step a metrics record and a screen line; a forced learning rate applied
to the restored optimizer and scheduler."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from rlarith import metrics
from rlarith.checkpoints import resumes_from
from rlarith.durable import storage_errors
from rlarith.preemption import agree
from rlarith.training.context import RunContext
from rlarith.training.identity import iso_time
from rlarith.training.logs import FILE_ONLY, log
from rlarith.training.sealing import seal_save


def window_reward(run: RunContext, trainer: Any) -> tuple[float, float, float]:
    """``(exact, total, elapsed)`` at a generation boundary: the mean exact-match and weighted total reward
    of every completion of the generation window that just ended, on every rank, from the reward functions'
    own values (``run.rewards``; TRL's logged metrics are emptied at every log, so with a window of several
    steps the boundary would find none), and rank 0's wall time for the save budget. One all-reduce when
    distributed, so every rank takes the same save decision. Empties ``run.rewards`` for the next window."""
    import torch
    import torch.distributed as dist

    exact = run.rewards.get("exact", [])
    per_name = [run.rewards.get(name, [0.0] * len(exact)) for name in run.reward_names]
    totals = [sum(w * v for w, v in zip(run.weights, values)) for values in zip(*per_name)]
    policy, main = run.policy, trainer.accelerator.is_main_process
    # rank 0 alone contributes the timing, so the sum carries its values to every rank
    timing = [policy.elapsed(), policy.save_s, policy.last_save_s] if main else [0.0, 0.0, 0.0]
    sums = [math.fsum(exact), math.fsum(totals), float(len(exact)), *timing]
    if dist.is_available() and dist.is_initialized():
        reduced = torch.tensor(sums, dtype=torch.float64, device=trainer.accelerator.device)  # (6,)
        dist.all_reduce(reduced)
        sums = reduced.tolist()
    run.rewards.clear()
    n = sums[2]
    policy.save_s, policy.last_save_s = sums[4], sums[5]
    return (sums[0] / n, sums[1] / n, sums[3]) if n else (math.nan, math.nan, sums[3])


def make_callbacks(run: RunContext, trainer: Any) -> list[Any]:
    from transformers import TrainerCallback

    boundary = run.cfg.training.steps_per_generation * run.cfg.training.num_iterations
    metrics_path = run.cfg.run_dir / metrics.METRICS
    screen_every = max(1, run.cfg.training.max_steps // 20)

    class StepBoundary(TrainerCallback):
        """At each step end: agree on a stop request, apply the save policy; seal each save."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            run.step_started = time.time()
            return control

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            step = state.global_step
            run.step_s = time.time() - run.step_started  # generation included (TRL generates in the step)
            if step % boundary:
                return control  # mid generation batch: saving here would not resume exactly
            exact, total, elapsed = window_reward(run, trainer)
            forced = []
            if step >= state.max_steps:
                forced.append(f"step {step} is the final step")
            if agree(run.stop.requested, trainer.accelerator.device):
                name = run.stop.received.name if run.stop.received else "a stop signal on another rank"
                forced.append(f"stop requested ({name})")
                control.should_training_stop, run.stopped = True, True
            reasons = run.policy.observe(step, exact, total, forced=forced, elapsed=elapsed)
            for line in run.policy.skipped if state.is_world_process_zero else ():
                log.info("%s", line, extra=FILE_ONLY)
            if reasons:
                # a stop exits right after its save, and the final step ends the run: both seal before
                run.save_sync = bool(forced) or not run.cfg.checkpoints.overlap
                run.pending_reward = run.policy.current()
                run.pending_reasons = reasons
                run.save_started = time.time()
                control.should_save = True
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            seal_save(run, trainer)  # every rank, right after the Trainer's save
            return control

    class Metrics(TrainerCallback):
        """Every logged step: a JSONL line and a screen line with ISO time and global step."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> Any:
            if not logs or not state.is_world_process_zero:
                return control
            record = {"time": iso_time(), "step": state.global_step, **logs}
            if run.traces is not None and "loss" in logs:  # the recorder's own cost, for benchmarks/traces.md
                record["traces/write_s"], run.trace_seconds = run.trace_seconds, 0.0
            step = state.global_step

            def intact() -> str:
                return "Every record before it stays in the file (readers skip a torn last line). " + (
                    resumes_from(run.cfg.run_dir)
                )

            with storage_errors(f"Appending step {step} to {metrics.METRICS}", metrics_path, intact):
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            shown = {
                k: v
                for k, v in logs.items()
                if k in ("loss", "reward", "rewards/exact/mean", "learning_rate")
            }
            if shown:
                # Every step is in the run's log; the screen shows about twenty of them per run.
                step, last = state.global_step, state.max_steps
                on_screen = step % screen_every == 0 or step >= last or step == 1
                log.info(
                    "%s",
                    " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
                    ),
                    extra=None if on_screen else FILE_ONLY,
                )
            if run.traces is not None:
                run.traces.write_metrics(
                    state.global_step, {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                )
            return control

    return [StepBoundary(), Metrics()]


def apply_learning_rate(lr_scheduler: Any, new: float) -> float | None:
    """Make a forced learning-rate change take effect on a resumed run: the optimizer and scheduler states
    restored from the checkpoint carry the old rate (param groups' ``lr``, the scheduler's ``base_lrs``),
    so both are set to ``new``, keeping the schedule's current factor (warmup). Returns the old rate, or
    None when it already was ``new``."""
    base = list(getattr(lr_scheduler, "base_lrs", []))
    if not base or all(math.isclose(b, new, rel_tol=1e-9) for b in base):
        return None
    groups = lr_scheduler.optimizer.param_groups
    for group, old in zip(groups, base):
        group["lr"] = group["lr"] * new / old if old else new
        group["initial_lr"] = new
    lr_scheduler.base_lrs = [new] * len(base)
    lr_scheduler._last_lr = [group["lr"] for group in groups]
    return base[0]


def forced_learning_rate(learning_rate: float) -> Any:
    """A callback that runs ``apply_learning_rate`` once the checkpoint's states are loaded, and logs it."""
    from transformers import TrainerCallback

    class ForcedLearningRate(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step > 0:  # resumed: the states came from the checkpoint
                old = apply_learning_rate(kwargs.get("lr_scheduler"), learning_rate)
                if old is not None:
                    log.info(
                        "forced change applied: learning rate %g -> %g on the optimizer and scheduler "
                        "restored at step %d",
                        old,
                        learning_rate,
                        state.global_step,
                    )
            return control

    return ForcedLearningRate()
