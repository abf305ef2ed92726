"""What TRL's GRPOTrainer is given for a run: its ``GRPOConfig``, the dataset rows, the reward functions
and the DeepSpeed JSON, each a pure function of the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlarith.checkpoints import staging_dir
from rlarith.config import RunConfig
from rlarith.data import TrainProblems
from rlarith.prompts import messages
from rlarith.rewards import REWARD_FUNCTIONS


def deepspeed_config(cfg: RunConfig) -> str | None:
    """The DeepSpeed JSON for ``training.deepspeed`` (validated by rlarith.config): ``zero2``/``zero3`` are
    package data (rlarith/deepspeed/), so an installed wheel finds them; anything else is the user's path."""
    name = cfg.training.deepspeed
    if name == "none":
        return None
    if name in ("zero2", "zero3"):
        # Beside this package in a checkout and in an installed wheel alike. Not importlib.resources:
        # rlarith is a namespace package (no __init__.py), which files() rejects under an editable install.
        return str(Path(__file__).resolve().parent.parent / "deepspeed" / f"{name}.json")
    return name


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
        ddp_timeout=t.collective_timeout_s,  # a vanished peer fails the job in minutes, not 30
    )


def start_process_group(timeout_s: int) -> None:
    """On CPU, start the gloo process group with ``training.collective_timeout_s`` before accelerate does:
    transformers hands ``ddp_timeout`` to accelerate on GPU only, so on CPU a rank whose peer vanished
    would wait torch's default 30 minutes in its collective. On GPU ``ddp_timeout`` does it."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
