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

What this file adds around TRL:
- problems come from ``rlarith.data`` in a fixed, seeded order (TRL's shuffle is off), so the data
  position at step S is a pure function of S and resume needs no data state;
- the notebook's checkpoint policy (``rlarith.checkpoints``): saves on a schedule, on a reward threshold and
  on a new best, only at generation boundaries, written to a staging folder and sealed complete, then
  pruned to first / second-to-last / latest (+ best);
- every start is a resume from the latest valid checkpoint of the run directory;
- SIGTERM / SIGUSR2 only raise a flag (``rlarith.preemption``); at the next step boundary all ranks agree,
  save, seal their traces and exit with ``EXIT_STOPPED`` (75) so a wrapper requeues the job;
- per-sample traces of every step (``rlarith.traces``) and per-step metrics with ISO timestamps in
  ``metrics.jsonl`` and TensorBoard.

Launch:
    rlarith train -c configs/default.yaml [key=value ...]                   # one process, CPU or one GPU
    torchrun --nproc_per_node 2 -m rlarith.train -c configs/default.yaml training.deepspeed=zero2
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlarith import metrics as metrics_file
from rlarith.checkpoints import (
    STATE_FILE,
    SavePolicy,
    checkpoint_path,
    clean_staging,
    latest_valid,
    latest_verified,
    load_policy_state,
    prune,
    seal,
    staging_dir,
    step_of,
)
from rlarith.config import ConfigError, RunConfig, flat, load_config, save_config
from rlarith.data import TrainProblems, make_task
from rlarith.grace import verdict
from rlarith.preemption import EXIT_STOPPED, StopRequest, agree
from rlarith.prompts import messages
from rlarith.quiet import expect_tied_keys, warn_once
from rlarith.rewards import REWARD_FUNCTIONS
from rlarith.runlock import RunLock

log = logging.getLogger("rlarith")

# Keys that may change between the attempts of one run: they do not change what is trained (runs_dir:
# where the run lives; a run directory moved or copied elsewhere is the same run).
RESUMABLE_KEYS = (
    "runs_dir",
    "training.max_steps",
    "training.logging_steps",
    "training.report_to",
    "eval.",
    "slurm.",
    "traces.",
)


# ----------------------------------------------------------------------------------------------------------
# Who is running: rank, attempt, run id


def iso_time(seconds: float | None = None) -> str:
    """``2026-11-26T04:08:20.897Z``: UTC, milliseconds (``seconds`` since the epoch; default now)."""
    moment = datetime.now(timezone.utc) if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Attempt:
    """One start of a run: a SLURM job restart or a local process."""

    id: str
    seq: int
    """Orders attempts chronologically (the reader keeps each step from the latest attempt)."""

    @classmethod
    def current(cls) -> Attempt:
        job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
        if job:
            return cls(id=f"{job}.{restarts}", seq=time.time_ns())
        return cls(id=f"local-{socket.gethostname()}-{os.getpid()}", seq=time.time_ns())


def run_id(cfg: RunConfig) -> str:
    """Name plus a hash of everything that defines the run (not the resumable keys)."""
    fixed = {k: v for k, v in flat(cfg).items() if not k.startswith(RESUMABLE_KEYS)}
    digest = hashlib.sha1(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.name}-{digest}"


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------------------------------------
# Checks that run before any compute is spent


# Keys a resumed run cannot take a new value for: what they set is restored from the checkpoint. A
# change is refused even with --force (recorded but not applied would be a lie); a new run can have it.
FIXED_ON_RESUME = {
    "model.path": "the weights are restored from the checkpoint, not loaded from model.path (a moved "
    "model directory: leave a symlink at the old path)",
    "training.seed": "the random state is restored from the checkpoint; a new seed would only reorder the "
    "remaining problems",
    "training.deepspeed": "the optimizer state is stored in the layout of the checkpoint's DeepSpeed "
    "setting and cannot be loaded under another",
}
FORCED_RECORD = "forced.jsonl"
"""``<run>/forced.jsonl``: one line per start that --force'd a config change (from/to run id, the keys)."""


def _stored_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}  # damaged: verification at start moves it aside


def _accepted_ids(run_dir: Path, target: str) -> set[str]:
    """The run ids that forced starts (``FORCED_RECORD``) turned, step by step, into ``target``."""
    edges: list[tuple[str, str]] = []
    path = run_dir / FORCED_RECORD
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
            edges.append((str(entry["from"]), str(entry["to"])))
        except (ValueError, KeyError, TypeError):
            continue
    accepted, grew = {target}, True
    while grew:
        grew = False
        for a, b in edges:
            if b in accepted and a not in accepted:
                accepted.add(a)
                grew = True
    return accepted


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(
        k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_KEYS)
    )


@dataclass
class ForcedChange:
    """A start that changed the run's config with --force: what it came from and what changed."""

    from_id: str
    to_id: str
    changes: dict[str, tuple[Any, Any]]

    def __str__(self) -> str:
        return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.changes.items()) or "run id only"


def check_run_dir(cfg: RunConfig, force: bool) -> ForcedChange | None:
    """The run dir must be writable, and a run dir made by another config is refused unless forced.

    "Made by" is read from ``config.yaml`` and from the run id stored in the latest checkpoint (so a
    deleted or edited config.yaml hides nothing). A forced change of a key in ``FIXED_ON_RESUME`` is
    refused anyway; any other is returned, to be recorded (``FORCED_RECORD``) and applied."""
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"runs_dir/name: cannot write to the run directory {str(run_dir)!r} ({err.strerror}); "
            "choose a writable runs_dir."
        ) from None
    new, new_id = flat(cfg), run_id(cfg)
    sources: list[tuple[str, str, dict[str, Any] | None]] = []  # (what, its run id, its flat config)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old_cfg = load_config(saved)
        sources.append(("config.yaml", run_id(old_cfg), flat(old_cfg)))
    latest = latest_valid(run_dir)
    stored = _stored_state(latest) if latest is not None else {}
    if stored.get("run_id") and stored["run_id"] not in _accepted_ids(run_dir, new_id):
        sources.append((f"{latest.name} (run id {stored['run_id']})", stored["run_id"], stored.get("config")))
    for what, old_id, old in sources:
        changed = _changed(old, new) if old is not None else []
        if not changed and (old is not None or old_id == new_id):
            continue
        diff = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6]) if old else (
            f"run id {old_id} -> {new_id}"
        )  # fmt: skip
        fixed = [k for k in changed if k in FIXED_ON_RESUME]
        if fixed:
            raise ConfigError(
                f"{fixed[0]}: cannot change when resuming the run directory {str(run_dir)!r}, even with "
                f"--force ({diff}, per {what}): {FIXED_ON_RESUME[fixed[0]]}. Pick another name=... to "
                "start a new run with it."
            )
        if not force:
            raise ConfigError(
                f"the run directory {str(run_dir)!r} was made by a different config ({diff}; per {what}). "
                "Resuming it would mix two experiments: pick another name=..., or pass --force to resume "
                "anyway."
            )
        return ForcedChange(old_id, new_id, {k: (old.get(k), new.get(k)) for k in changed} if old else {})
    return None


def record_forced(run_dir: Path, forced: ForcedChange, attempt: str) -> None:
    """Append the forced change to ``FORCED_RECORD`` (rank 0, under the run lock)."""
    entry = {
        "time": iso_time(),
        "attempt": attempt,
        "from": forced.from_id,
        "to": forced.to_id,
        "changes": {k: [a, b] for k, (a, b) in forced.changes.items()},
    }
    with (run_dir / FORCED_RECORD).open("a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")


def check_model_path(cfg: RunConfig) -> None:
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        hint = (
            "run `rlarith bootstrap` first to build it"
            if cfg.model.path == "runs/bootstrap/model"
            else "point it at a directory saved with save_pretrained (config.json, weights, tokenizer)"
        )
        raise ConfigError(f"model.path: {str(path)!r} is not a model directory (no config.json); {hint}.")
    if not os.access(path / "config.json", os.R_OK):
        raise ConfigError(f"model.path: {str(path / 'config.json')!r} is not readable; fix its permissions.")


def check_batch(cfg: RunConfig, world_size: int) -> int:
    """Completions per rank per step; the group layout must divide evenly across ranks."""
    completions = cfg.training.prompts_per_step * cfg.training.num_generations
    if completions % world_size:
        raise ConfigError(
            f"training.prompts_per_step x training.num_generations = {completions} completions per step "
            f"must divide evenly across {world_size} ranks; change prompts_per_step."
        )
    return completions // world_size


def deepspeed_config(cfg: RunConfig) -> str | None:
    """The DeepSpeed JSON for ``training.deepspeed`` (validated by rlarith.config): ``zero2``/``zero3`` are
    package data (rlarith/deepspeed/), so an installed wheel finds them; anything else is the user's path."""
    name = cfg.training.deepspeed
    if name == "none":
        return None
    if name in ("zero2", "zero3"):
        # Beside this module in a checkout and in an installed wheel alike. Not importlib.resources:
        # rlarith is a namespace package (no __init__.py), which files() rejects under an editable install.
        return str(Path(__file__).resolve().parent / "deepspeed" / f"{name}.json")
    return name


# ----------------------------------------------------------------------------------------------------------
# The trainer


def reward_functions(cfg: RunConfig, sink: dict[str, list[float]]) -> list[Any]:
    """Every component, named as in the config (TRL logs ``rewards/<name>/mean``). Each call also leaves
    its values in ``sink``, so the traces record exactly the rewards the trainer used."""
    funcs = []
    for name, fn in REWARD_FUNCTIONS.items():

        def component(
            completions: list[Any], answer: list[int], _fn: Any = fn, _name: str = name, **kwargs: Any
        ) -> list[float]:
            sink[_name] = _fn(completions, answer, mode=cfg.rewards.extraction)
            return sink[_name]

        component.__name__ = name
        funcs.append(component)
    return funcs


def build_dataset(cfg: RunConfig, stream: TrainProblems) -> Any:
    """One row per prompt of the whole run, in the stream's order: row i is the run's i-th problem."""
    from datasets import Dataset

    task = stream.task
    rows = {"prompt": [], "answer": [], "key": []}
    for i in range(cfg.training.max_steps * cfg.training.prompts_per_step):
        problem = stream.problem(i)
        rows["prompt"].append(messages(problem, cfg.prompt, task.integer_answers))
        rows["answer"].append(problem.answer)
        rows["key"].append(problem.key)
    return Dataset.from_dict(rows)


def grpo_config(cfg: RunConfig, per_device: int, deepspeed: str | None, weights: list[float]) -> Any:
    """TRL's ``GRPOConfig`` for a run (also the bare-TRL baseline of benchmarks/gpu_overhead.py)."""
    import torch
    from trl import GRPOConfig

    on_gpu = torch.cuda.is_available()
    t = cfg.training
    return GRPOConfig(
        output_dir=str(staging_dir(cfg.run_dir)),
        seed=t.seed,
        data_seed=t.seed,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=t.warmup_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1,
        num_generations=t.num_generations,
        max_completion_length=t.max_completion_length,
        temperature=t.temperature,
        beta=t.beta,
        loss_type=t.loss_type,
        steps_per_generation=t.steps_per_generation,
        num_iterations=t.num_iterations,
        max_grad_norm=t.max_grad_norm,
        reward_weights=weights,
        shuffle_dataset=False,  # the order is ours: rlarith.data, a pure function of (seed, index)
        save_strategy="no",  # saves are decided by the StepBoundary callback
        logging_steps=t.logging_steps,
        report_to=list(t.report_to),
        deepspeed=deepspeed,
        bf16=on_gpu and cfg.model.dtype == "bfloat16",
        fp16=on_gpu and cfg.model.dtype == "float16",
        use_cpu=not on_gpu,
        gradient_checkpointing=t.gradient_checkpointing,
        disable_tqdm=True,
        log_completions=False,  # traces record every completion of every step instead
        dataloader_num_workers=0,
    )


def make_trainer_class() -> type:
    """Subclass GRPOTrainer (imported late: the launcher must not import torch)."""
    from trl import GRPOTrainer

    class RlarithTrainer(GRPOTrainer):
        """GRPOTrainer that saves through the staging folder and records traces."""

        run: RunContext

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            pass  # TRL writes it into the output dir (our staging folder) at every save; nothing reads it

        def _get_output_dir(self, trial: Any) -> str:
            return str(staging_dir(self.run.cfg.run_dir))  # HF writes here; seal() moves it when complete

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            run, step = self.run, self.state.global_step
            started = time.time()
            # Every rank writes its part: weights, optimizer, scheduler, RNG, DeepSpeed shards.
            super()._save_checkpoint(model, trial)
            run.policy.record_save(step, run.pending_reward, run.pending_reasons, time.time() - started)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
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
                    required=checkpoint_contents(step, self.args.world_size, self.is_deepspeed_enabled),
                )
                report = prune(
                    run.cfg.run_dir, run.policy.best_step, run.cfg.checkpoints.keep_best, verified=step
                )
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
            if self.accelerator.is_main_process and not run.grace_checked:
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
            self.accelerator.wait_for_everyone()

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            output = super()._generate_and_score_completions(inputs)
            if self.run.traces is not None:
                self.run.record(self, inputs, output)
            return output

    return RlarithTrainer


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


class RunContext:
    """What the callbacks and the trainer subclass share for one attempt."""

    def __init__(self, cfg: RunConfig, attempt: Attempt, stop: StopRequest) -> None:
        self.cfg, self.attempt, self.stop = cfg, attempt, stop
        self.run_id = run_id(cfg)
        self.policy = SavePolicy.from_config(cfg.checkpoints)
        self.pending_reward, self.pending_reasons = 0.0, []  # set by the step callback before a save
        self.stopped = False
        self.step_started, self.step_s = time.time(), 0.0  # the last step's wall time (grace budget)
        self.grace_checked = False  # the budget is judged once per attempt, after its first save
        self.traces: Any = None  # rlarith.traces.TraceWriter when enabled
        self.reward_names = list(REWARD_FUNCTIONS)
        self.weights = [float(cfg.rewards.weights.get(n, 0.0)) for n in self.reward_names]
        self.trace_seconds = 0.0  # time spent recording traces since the last log line
        self.rewards: dict[str, list[float]] = {}  # this generation batch's values, per component

    def record(self, trainer: Any, inputs: list[dict[str, Any]], output: dict[str, Any]) -> None:
        """One trace row per local completion: exact model input and output, rewards, advantage."""
        from rlarith.answers import extract_answer

        started = time.perf_counter()
        tok = trainer.processing_class
        prompt_ids, prompt_mask = (
            output["prompt_ids"].cpu(),
            output["prompt_mask"].cpu(),
        )  # (n, P), left-padded
        completion_ids = output["completion_ids"].cpu()  # (n, C), right-padded
        completion_mask = output["completion_mask"].cpu()  # (n, C)
        prompts = [
            tok.decode(ids[m.bool()].tolist(), skip_special_tokens=False)
            for ids, m in zip(prompt_ids, prompt_mask)
        ]
        ids_list = [ids[m.bool()].tolist() for ids, m in zip(completion_ids, completion_mask)]
        completions = tok.batch_decode(ids_list, skip_special_tokens=True)
        truths = [int(x["answer"]) for x in inputs]
        samples: dict[str, list[Any]] = {
            "prompt": prompts,
            "completion": completions,
            "completion_ids": ids_list,
            "key": [x["key"] for x in inputs],
            "truth": truths,
            "parsed": [extract_answer(c, self.cfg.rewards.extraction) for c in completions],
        }
        total = [0.0] * len(completions)
        for name, weight in zip(self.reward_names, self.weights):
            values = self.rewards[name]  # what the reward functions returned for this very batch
            samples[f"reward/{name}"] = values
            total = [t + weight * v for t, v in zip(total, values)]
        samples["reward_total"] = total
        samples["advantage"] = output["advantages"].cpu().tolist()
        self.traces.write_step(trainer.state.global_step + 1, samples)
        self.trace_seconds += time.perf_counter() - started


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
    metrics_path = run.cfg.run_dir / "metrics.jsonl"
    screen_every = max(1, run.cfg.training.max_steps // 20)

    class StepBoundary(TrainerCallback):
        """At each step end: agree on a stop request, apply the save policy."""

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
                run.pending_reward = run.policy.current()
                run.pending_reasons = reasons
                control.should_save = True
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


FILE_ONLY = {"file_only": True}
"""``log.info(..., extra=FILE_ONLY)``: a detail for the run's log file, not the screen."""


def _screen(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


class _StepFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.trainer: Any = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.step = self.trainer.state.global_step if self.trainer is not None else 0
        record.rank = global_rank()
        return True


class _IsoFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return (
            datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"
        )


def setup_logging() -> _StepFilter:
    """Every line: ISO-8601 UTC timestamp, global step, rank; on the screen and (``log_to_file``) in the run."""
    step_filter = _StepFilter()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_IsoFormatter("%(asctime)s step %(step)d rank %(rank)d | %(message)s"))
    handler.addFilter(step_filter)
    handler.addFilter(_screen)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return step_filter


def log_to_file(path: Path, step_filter: _StepFilter) -> None:
    """Also append every line to ``path`` (one file per rank): no need to pipe the output to keep it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(log.handlers[0].formatter)
    handler.addFilter(step_filter)
    log.addHandler(handler)


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


def _train(cfg: RunConfig, force: bool, stop: StopRequest, step_filter: _StepFilter, lock: RunLock) -> int:
    rank = global_rank()

    # Cheap checks first: no model is loaded before the config, paths and data are known to be good.
    check_model_path(cfg)
    forced = check_run_dir(cfg, force)
    lock.acquire(rank)  # one writer per run directory, before anything in it is written
    log_to_file(cfg.run_dir / "logs" / f"rank{rank}.log", step_filter)
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
    if stop.requested and world_size == 1:  # several ranks agree at a step boundary instead
        return _stopped_before_training(stop)
    attempt = Attempt.current()  # rank 0's is every rank's (broadcast below)
    if rank == 0:
        saved = cfg.run_dir / "config.yaml"
        if saved.is_file() and flat(load_config(saved)) != flat(cfg):  # keep the record of earlier attempts
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
        superseded = metrics_file.start_attempt(cfg.run_dir, attempt.id, attempt.seq, resumed_step)
        if superseded:
            log.info(
                "%d metrics records of steps after %d (to be re-run) moved to %s",
                superseded,
                resumed_step,
                metrics_file.SUPERSEDED,
            )

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
        from rlarith.traces import TraceWriter

        run.traces = TraceWriter(
            cfg.trace_dir,
            run_id=run.run_id,
            rank=rank,
            attempt=attempt.id,
            attempt_seq=attempt.seq,
            cfg=cfg.traces,
        )

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
    finally:
        if run.traces is not None:
            run.traces.close()
        if torch.distributed.is_initialized():  # DeepSpeed/DDP: leave no NCCL/gloo resources behind
            torch.distributed.destroy_process_group()
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


def main(argv: list[str] | None = None) -> int:
    """``python -m rlarith.train`` (for torchrun): the same arguments as ``rlarith train``."""
    from rlarith.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
