"""The ``rlarith eval`` job: what the path points at, the held-out set, the contamination check, then
scoring one model or every checkpoint of a run, and writing the results.

Order of operations, and why:

1. The held-out problems come from ``<run>/data/<split>.jsonl`` (written by ``rlarith data check``) or are
   rebuilt from the config with ``rlarith.data.heldout`` (same salt, same problems).
2. Contamination check before any scoring (``rlarith.contamination``).
3. Generation and scoring (``generation``, ``scoring``); results to ``<run>/eval/`` (``reports``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlarith.checkpoints import COMPLETE, step_of, valid_checkpoints
from rlarith.config import ConfigError, RunConfig, load_config
from rlarith.contamination import (
    check_contamination,
    contamination_error,
    stream_keys,
    traced_keys,
    unreadable_error,
)
from rlarith.data import heldout, make_task, read_problems
from rlarith.durable import write_atomic
from rlarith.evaluate.generation import check_sampling, evaluate_model
from rlarith.evaluate.reports import markdown_table, plot_over_steps, write_result
from rlarith.evaluate.scoring import EvalResult
from rlarith.tasks import Problem


@dataclass
class Target:
    """What ``rlarith eval PATH`` points at."""

    run_dir: Path
    """The run (for a bare model: the run its config describes); results go to ``run_dir / "eval"``."""
    cfg: RunConfig
    model_path: Path | None
    """The model to score; None for a run without a valid checkpoint."""
    step: int | None
    is_run: bool
    """False for a bare model evaluated with ``--config``."""


def resolve_target(path: str | Path, config: str | Path | None = None) -> Target:
    """A run directory (latest valid checkpoint), a checkpoint directory, or a bare model + ``config``."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        if config is not None:
            raise ConfigError(
                f"{str(path)!r} is a run directory with its own config.yaml; drop --config (it is for bare "
                "model directories)."
            )
        cfg = load_config(path / "config.yaml")
        ckpts = valid_checkpoints(path)
        step, model = ckpts[-1] if ckpts else (None, None)
        return Target(run_dir=path, cfg=cfg, model_path=model, step=step, is_run=True)
    step = step_of(path)
    run_dir = path.parent.parent
    if step is not None and path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
        if not (path / COMPLETE).is_file():
            raise ConfigError(
                f"{str(path)!r} has no COMPLETE file: the checkpoint was never finished (or is still being "
                "written); evaluate the run directory to get its latest complete checkpoint."
            )
        if config is not None:
            raise ConfigError(
                f"{str(path)!r} is a checkpoint of a run with its own config.yaml; drop --config (it is for "
                "bare model directories)."
            )
        cfg = load_config(run_dir / "config.yaml")
        return Target(run_dir=run_dir, cfg=cfg, model_path=path, step=step, is_run=True)
    if not path.exists():
        raise ConfigError(
            f"{str(path)!r} not found; pass a run directory, a checkpoint or a model directory."
        )
    if config is None:
        raise ConfigError(
            f"{str(path)!r} is neither a run (no config.yaml) nor one of its checkpoints; for a bare model "
            "pass --config with the run config that describes its task and training data."
        )
    cfg = load_config(config)
    return Target(run_dir=cfg.run_dir, cfg=cfg, model_path=path, step=None, is_run=False)


def heldout_problems(run_dir: Path, cfg: RunConfig, split: str, n: int) -> tuple[list[Problem], str]:
    """The first ``n`` problems of the run's held-out ``split`` and where they came from."""
    path = Path(run_dir) / "data" / f"{split}.jsonl"
    if path.is_file():
        problems, source = read_problems(path), str(path)
    else:
        size = getattr(cfg.data, f"{split}_size")
        problems, source = heldout(make_task(cfg.task), cfg.data, split, size), f"heldout({split!r}, {size})"
    return problems[:n], source


@dataclass
class EvalSettings:
    """Flags of ``rlarith eval``; None takes the run's ``eval`` config."""

    split: str | None = None
    n: int | None = None
    samples: int | None = None
    temperature: float | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    seed: int = 0

    def resolved(self, cfg: RunConfig) -> EvalSettings:
        out = EvalSettings(seed=self.seed)
        for f in ("split", "n", "samples", "temperature", "batch_size", "max_new_tokens"):
            value = getattr(self, f)
            setattr(out, f, getattr(cfg.eval, f) if value is None else value)
        if out.split not in ("val", "test"):
            raise ConfigError(f"--split: use val or test; got {out.split!r}.")
        for f in ("n", "batch_size", "max_new_tokens"):
            if getattr(out, f) < 1:
                raise ConfigError(f"--{f.replace('_', '-')}: must be at least 1; got {getattr(out, f)}.")
        check_sampling(out.samples, out.temperature)  # before any model is loaded
        return out


def run_eval(
    target: Target,
    settings: EvalSettings,
    *,
    force: bool = False,
    all_checkpoints: bool = False,
    progress: bool = True,
    log: Any = print,
) -> list[EvalResult]:
    """``rlarith eval``: held-out set, contamination check, then score one model or every checkpoint."""
    s = settings.resolved(target.cfg)
    problems, source = heldout_problems(target.run_dir, target.cfg, s.split, s.n)
    if len(problems) < s.n:
        log(f"note: {source} holds {len(problems)} problems; scoring all of them (asked for {s.n})")
    traced, unreadable = traced_keys(target.run_dir, target.cfg)
    if unreadable and not force:
        raise unreadable_error(unreadable, target.run_dir)
    for path, reason in unreadable:
        log(f"warning: --force: trace file {path} is unreadable ({reason}); its problems are unknown")
    overlap = check_contamination(problems, stream_keys(target.cfg) | traced)
    if overlap and not force:
        raise contamination_error(overlap, len(problems), source, target.run_dir)
    if overlap:
        log(f"warning: --force: scoring {len(overlap)} problems that could have been trained on")

    if all_checkpoints:
        if not target.is_run:
            raise ConfigError("--all-checkpoints needs a run directory (or one of its checkpoints).")
        models = [(0, Path(target.cfg.model.path))] + valid_checkpoints(target.run_dir)
        if not (models[0][1] / "config.json").is_file():
            raise ConfigError(
                f"model.path: the run's base model {target.cfg.model.path!r} is not a model directory from "
                "here; run from the directory the run was started in (relative paths), or fix model.path."
            )
    elif target.model_path is None:
        raise ConfigError(
            f"{str(target.run_dir)!r} has no valid checkpoint yet (checkpoints/checkpoint-<step>/ with "
            "COMPLETE); --all-checkpoints also scores the base model."
        )
    else:
        models = [(target.step, target.model_path)]

    eval_dir = target.run_dir / "eval"
    results = []
    for step, model_path in models:
        result = evaluate_model(
            model_path,
            problems,
            target.cfg,
            samples=s.samples,
            temperature=s.temperature,
            batch_size=s.batch_size,
            max_new_tokens=s.max_new_tokens,
            seed=s.seed,
            progress=progress,
            split=s.split,
            step=step,
        )
        result.contaminated = len(overlap)
        result.unreadable_traces = [str(path) for path, _ in unreadable]
        log(f"wrote {write_result(result, eval_dir)}")
        results.append(result)
    if all_checkpoints:
        stem = f"{s.split}-over-steps"
        write_atomic(
            eval_dir / f"{stem}.json",
            json.dumps([r.to_dict(records=False) for r in results], indent=1) + "\n",
        )
        write_atomic(eval_dir / f"{stem}.md", markdown_table(results))
        png = eval_dir / (
            "accuracy_over_steps.png" if s.split == "val" else f"accuracy_over_steps_{s.split}.png"
        )
        plot_over_steps({target.run_dir.name: results}, png, title=f"{target.run_dir.name}: {s.split}")
        log(f"wrote {eval_dir / (stem + '.json')} and {png}")
    return results
