"""Trace recording: one trace row per local completion of a generation batch (``Generated``: the batch as
rlarith.training.trainer's adapter reads it from TRL; the trainer calls ``record``, never the reverse)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlarith.answers import extract_answer

if TYPE_CHECKING:
    from rlarith.training.context import RunContext


@dataclass(frozen=True)
class Generated:
    """One generation batch as TRL scored it (this rank's completions; tensors moved to the CPU)."""

    prompt_ids: Any  # (n, P) int, left-padded
    prompt_mask: Any  # (n, P) 0/1, zeros first
    completion_ids: Any  # (n, C) int, right-padded
    completion_mask: Any  # (n, C) 0/1, zeros last
    advantages: Any  # (n,) float


def record(run: RunContext, trainer: Any, inputs: list[dict[str, Any]], batch: Generated) -> None:
    """One trace row per local completion: exact model input and output, rewards, advantage."""
    started = time.perf_counter()
    tok = trainer.processing_class
    prompts = [
        tok.decode(ids[m.bool()].tolist(), skip_special_tokens=False)
        for ids, m in zip(batch.prompt_ids, batch.prompt_mask)
    ]
    ids_list = [ids[m.bool()].tolist() for ids, m in zip(batch.completion_ids, batch.completion_mask)]
    completions = tok.batch_decode(ids_list, skip_special_tokens=True)
    truths = [int(x["answer"]) for x in inputs]
    samples: dict[str, list[Any]] = {
        "prompt": prompts,
        "completion": completions,
        "completion_ids": ids_list,
        "key": [x["key"] for x in inputs],
        "truth": truths,
        "parsed": [extract_answer(c, run.cfg.rewards.extraction) for c in completions],
    }
    total = [0.0] * len(completions)
    for name, weight in zip(run.reward_names, run.weights):
        values = run.rewards[name]  # what the reward functions returned for this very batch
        samples[f"reward/{name}"] = values
        total = [t + weight * v for t, v in zip(total, values)]
    samples["reward_total"] = total
    samples["advantage"] = batch.advantages.tolist()
    run.traces.write_step(trainer.state.global_step + 1, samples)
    run.trace_seconds += time.perf_counter() - started
