"""Checks that run before any compute is spent: the run directory (writable; made by this config, or a
forced change recorded), the model path, and the batch layout across ranks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlarith.checkpoints import STATE_FILE, latest_valid
from rlarith.config import (
    RESUMABLE_KEYS,
    RUN_CONFIG,
    ConfigDamaged,
    ConfigError,
    RunConfig,
    flat,
    load_run_config,
)
from rlarith.durable import writable
from rlarith.training.identity import iso_time, run_id

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
    deleted or edited config.yaml hides nothing). A damaged ``config.yaml`` (empty after a crash) is never
    read as the defaults: the copy of the config sealed into the latest checkpoint is the record then, and
    without one the start is refused with the fix (with no checkpoint at all there is nothing to resume,
    and the start goes on; ``train`` sets the damaged file aside). A forced change of a key in ``FIXED_ON_RESUME`` is
    refused anyway; any other is returned, to be recorded (``FORCED_RECORD``) and applied."""
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        problem = writable(run_dir)  # a real write of some data: a full disk takes an empty file
    except OSError as err:
        problem = err.strerror
    if problem:
        raise ConfigError(
            f"runs_dir/name: cannot write to the run directory {str(run_dir)!r} ({problem}); free space there "
            "or choose a writable runs_dir."
        )
    new, new_id = flat(cfg), run_id(cfg)
    sources: list[tuple[str, str, dict[str, Any] | None]] = []  # (what, its run id, its flat config)
    latest = latest_valid(run_dir)
    stored = _stored_state(latest) if latest is not None else {}
    saved, damaged = run_dir / RUN_CONFIG, None
    if saved.exists():
        try:
            old_cfg = load_run_config(run_dir)
            sources.append((RUN_CONFIG, run_id(old_cfg), flat(old_cfg)))
        except ConfigDamaged as err:
            damaged = err  # the checkpoint's copy below is the record; with none, refused
    if damaged is not None and latest is not None and not isinstance(stored.get("config"), dict):
        raise ConfigDamaged(
            damaged.path,
            damaged.why,
            f"{latest.name} holds no copy of the config (sealed by an older rlarith) to check this start "
            f"against. Restore the file from the YAML and overrides the run was started with: `rlarith config "
            f"-c FILE [key=value ...] > {saved}`.",
        )
    if stored.get("run_id") and (
        damaged is not None or stored["run_id"] not in _accepted_ids(run_dir, new_id)
    ):
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


def check_trace_dir(cfg: RunConfig) -> None:
    """The trace folder takes a file (with data, fsynced) before any model is loaded: an unwritable or full
    one would otherwise fail at the first step, after the load."""
    if not cfg.traces.enabled:
        return
    problem = writable(cfg.trace_dir)
    if problem:
        raise ConfigError(
            f"traces.dir: cannot write to the trace folder {str(cfg.trace_dir)!r} ({problem}); free space "
            "there, set traces.dir (or SCRATCH) to a writable folder, or traces.enabled=false."
        )
    from rlarith.traces.owner import check  # a folder of another run directory: refused before the load too

    check(cfg.trace_dir, run_id(cfg), cfg.run_dir)


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
        fh.flush()
        os.fsync(fh.fileno())  # the record of why this run's config differs must survive a crash


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
