"""The positive control anyone can run on a laptop: bootstrap, measure, GRPO, measure again.

``rlarith demo`` (``make demo``) with the embedded defaults (configs/default.yaml):
1. ``rlarith bootstrap``: the tiny local model, SFT-warmed on 2-digit addition until half its greedy
   answers are right (reused when ``model.path`` already holds a model);
2. held-out validation accuracy and mean reward of that model (greedy, and sampled at the training
   temperature, which is what GRPO optimises);
3. ``rlarith train``: GRPO from it (resumes if the run already has checkpoints; nothing to do if it
   finished);
4. the same measurements on the final checkpoint, and the verdict (rlarith.verdict): PASS when greedy
   correctness on the same held-out problems rose, by an exact McNemar test at p < 0.01.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rlarith.config import RunConfig

SAMPLES = 4
"""Completions per problem for the sampled measurement."""


def measure(model: Path, cfg: RunConfig) -> tuple[dict[str, float], list[bool]]:
    """Greedy and sampled held-out accuracy and mean reward of ``model``; and per-problem greedy correctness
    (for the paired verdict)."""
    from rlarith.evaluate import evaluate_model

    val = problems(cfg)
    max_new = cfg.training.max_completion_length
    greedy = evaluate_model(model, val, cfg, batch_size=cfg.eval.batch_size, max_new_tokens=max_new)
    sampled = evaluate_model(
        model,
        val,
        cfg,
        samples=SAMPLES,
        temperature=cfg.training.temperature,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=max_new,
        seed=cfg.training.seed,
    )
    right = [r["parsed_strict"] == r["truth"] for r in greedy.records]
    label = f"(T={cfg.training.temperature:g}, {SAMPLES} samples)"
    return {
        "greedy accuracy": greedy.accuracy,
        f"sampled accuracy {label}": sampled.accuracy,
        f"sampled mean reward {label}": sampled.mean_reward,
    }, right


def problems(cfg: RunConfig) -> list[Any]:
    """The held-out problems the demo scores: the first ``eval.n`` of the validation set."""
    from rlarith.data import heldout, make_task

    return heldout(make_task(cfg.task), cfg.data, "val", min(cfg.eval.n, cfg.data.val_size))


def demo(cfg: RunConfig) -> int:
    from transformers.utils import logging as hf_logging

    from rlarith.bootstrap import RECORD, bootstrap, check_reusable
    from rlarith.checkpoints import latest_valid, step_of
    from rlarith.launch import submit
    from rlarith.training.preflight import check_run_dir
    from rlarith.verdict import paired_verdict

    hf_logging.disable_progress_bar()  # weight-loading bars at every measurement; the eval bars stay
    started = time.time()
    model = Path(cfg.model.path)
    if (model / "config.json").is_file():
        built = (
            "built for this config"
            if check_reusable(model, cfg)
            else f"no {RECORD}: what built it is unknown"
        )
        print(f"[1/4] bootstrap: reusing {model} ({built}; delete it to build it again)")
    else:
        print(f"[1/4] bootstrap: SFT-warming the tiny model into {model}")
        bootstrap(cfg, evaluate=False)
    n = len(problems(cfg))
    print(
        f"[2/4] measuring the starting model on {n} held-out problems (greedy, then {SAMPLES} samples each)"
    )
    before, right_before = measure(model, cfg)
    latest = latest_valid(cfg.run_dir)
    if latest is not None and step_of(latest) >= cfg.training.max_steps:
        check_run_dir(cfg, force=False)  # the finished run must be this config's, or we measure another one
        print(
            f"[3/4] GRPO: nothing to train: {cfg.run_dir} already finished all {cfg.training.max_steps} steps "
            f"({latest.name}); delete {cfg.run_dir} to train again"
        )
    else:
        resuming = f", resuming from {latest.name}" if latest is not None else ""
        print(f"[3/4] GRPO: {cfg.training.max_steps} steps in {cfg.run_dir}{resuming}")
        # The main job runs as the cluster runs it: a submitit job (slurm.executor, local by default) whose
        # driver starts the trainer; its lines are echoed here.
        status = submit(cfg, wait=True, echo=True)
        if status != 0:
            return status
    final = latest_valid(cfg.run_dir)
    assert final is not None, "training finished without a checkpoint"
    print(f"[4/4] measuring {final}")
    after, right_after = measure(final, cfg)

    print(f"\n| held-out ({n} val problems) | before | after |\n|---|---|---|")
    for key in before:
        print(f"| {key} | {before[key]:.3f} | {after[key]:.3f} |")
    verdict = paired_verdict(right_before, right_after)
    print(f"\npositive control: {verdict}")
    print(f"(demo took {time.time() - started:.0f} s)")
    return 0 if verdict.passed else 1
