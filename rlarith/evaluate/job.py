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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlarith.checkpoints import (
    COMPLETE,
    checkpoints_dir,
    latest_valid,
    run_config,
    step_of,
    valid_checkpoints,
)
from rlarith.config import ConfigError, RunConfig, load_config
from rlarith.contamination import (
    check_contamination,
    contamination_error,
    stream_keys,
    traced_keys,
    unreadable_error,
)
from rlarith.data import heldout, make_task, read_problems
from rlarith.durable import storage_errors, write_atomic
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
    note: str | None = None
    """Said before scoring: e.g. config.yaml was damaged and a checkpoint's copy of the config is used."""
    latest: bool = False
    """``model_path`` is the run's latest valid checkpoint (not one the user named): should retention delete
    it before it is loaded, the new latest one is scored instead."""


class Pruned(Exception):
    """A checkpoint deleted after it was chosen (by the run's retention, while the run trains)."""


def resolve_target(path: str | Path, config: str | Path | None = None) -> Target:
    """A run directory (latest valid checkpoint), a checkpoint directory, or a bare model + ``config``."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        if config is not None:
            raise ConfigError(
                f"{str(path)!r} is a run directory with its own config.yaml; drop --config (it is for bare "
                "model directories)."
            )
        cfg, note = run_config(path)
        ckpts = valid_checkpoints(path)
        step, model = ckpts[-1] if ckpts else (None, None)
        return Target(run_dir=path, cfg=cfg, model_path=model, step=step, is_run=True, note=note, latest=True)
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
        cfg, note = run_config(run_dir, checkpoint=path)  # a damaged config.yaml: this checkpoint's copy
        return Target(run_dir=run_dir, cfg=cfg, model_path=path, step=step, is_run=True, note=note)
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


def _score(
    model_path: Path, problems: list[Problem], cfg: RunConfig, checkpoint: bool, **kwargs: Any
) -> EvalResult:
    """``evaluate_model``; for a checkpoint, ``Pruned`` when it lost ``COMPLETE`` before its weights were in
    memory. Retention removes ``COMPLETE`` before any file, so a checkpoint that still holds it once the
    model is loaded was whole while it loaded; one that lost it may have lost files under the loader."""

    def whole() -> None:
        if checkpoint and not (model_path / COMPLETE).is_file():
            raise Pruned(model_path)

    whole()
    try:
        return evaluate_model(model_path, problems, cfg, loaded=whole, **kwargs)
    except Pruned:
        raise
    except Exception:  # whatever a loader says about files vanishing under it (OSError, HFValidationError...)
        whole()
        raise


def _score_latest_instead(
    target: Target, gone: Path, score: Callable[[int | None, Path], EvalResult], log: Any
) -> tuple[int | None, Path, EvalResult]:
    """The chosen checkpoint was pruned: score the run's new latest valid one (when the user asked for the
    latest), saying so; a checkpoint the user named, or none left, is a clear error."""
    for _ in range(5):  # a run that saves faster than a model loads would never settle
        newer = latest_valid(target.run_dir) if target.latest else None
        if newer is None or newer == gone:
            break
        log(
            f"note: {gone.name} was deleted by the run's retention while it was loading (the run is training); "
            f"scoring {newer.name}, now the latest valid checkpoint"
        )
        try:
            return step_of(newer), newer, score(step_of(newer), newer)
        except Pruned:
            gone = newer
    raise ConfigError(
        f"{str(gone)!r} was deleted before it could be scored (retention keeps the first, second-to-last, latest "
        f"and best checkpoints while a run trains): evaluate the run directory {str(target.run_dir)!r} for its "
        "latest checkpoint, or name one that retention keeps."
    )


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
    if target.note:
        log(f"note: {target.note}")
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

    def score(step: int | None, model_path: Path) -> EvalResult:
        return _score(
            model_path,
            problems,
            target.cfg,
            checkpoint=target.is_run and model_path.parent == checkpoints_dir(target.run_dir),
            samples=s.samples,
            temperature=s.temperature,
            batch_size=s.batch_size,
            max_new_tokens=s.max_new_tokens,
            seed=s.seed,
            progress=progress,
            split=s.split,
            step=step,
        )

    eval_dir = target.run_dir / "eval"
    results, skipped = [], []
    for step, model_path in models:
        try:
            result = score(step, model_path)
        except Pruned:
            if not all_checkpoints:
                step, model_path, result = _score_latest_instead(target, model_path, score, log)
            else:
                log(
                    f"skipped {model_path.name}: deleted after it was listed (by the run's retention, while "
                    "the run trains); scoring the rest"
                )
                skipped.append(model_path.name)
                continue
        result.contaminated = len(overlap)
        result.unreadable_traces = [str(path) for path, _ in unreadable]
        with storage_errors(
            f"Writing the result of {model_path.name}", eval_dir, "The results written before it are intact."
        ):
            log(f"wrote {write_result(result, eval_dir)}")
        results.append(result)
    if skipped:
        log(f"{len(skipped)} checkpoint(s) deleted before they were scored: {', '.join(skipped)}")
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
