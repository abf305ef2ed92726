"""Checkpoints: when to save, how a save becomes valid, and which saves are kept.

The lab notebook's policy, as implemented here:

- **When** (``SavePolicy.observe``, once per step at generation boundaries): save when the step is a
  multiple of ``save_every``; when the step's reward exceeds ``reward_threshold``; and, with
  ``save_on_best``, when that reward is a new best. The reward is ``reward_metric``: ``exact`` (mean
  exact match), ``total`` (the weighted sum) or ``smoothed`` (an EMA of exact, alpha 0.1). Every save
  carries its reasons as sentences, and ``SavePolicy.report`` is its screen report: when a reward caused
  the save it names the reward, the old best and the new.
- **Valid** (``seal``): the HF Trainer writes a checkpoint into ``checkpoints/.staging/``; ``seal`` adds
  the policy state (``rlarith_state.json``), fsyncs every file and folder, writes ``COMPLETE`` last and
  renames the folder to ``checkpoints/checkpoint-<step>``. Readers trust only folders that hold
  ``COMPLETE`` (``valid_checkpoints``), so a crash at any moment leaves the old state or the new, never a
  half-written checkpoint that looks whole. ``clean_staging`` (at start, rank 0) removes what interrupted
  saves and deletions left behind.
- **Kept** (``retained``, ``prune``): after every save only the first, the second-to-last and the most
  recent valid checkpoints remain, plus the best saved one when ``keep_best``. The first is the run's
  origin; the second-to-last is the fallback should the latest turn out bad. ``prune`` deletes the rest
  and its ``PruneReport`` says what was removed, the space freed and what remains.

A checkpoint is a full training state (weights, optimizer, scheduler, RNG, trainer and policy state), so
training restarts from any valid one. This module never imports torch: it only moves folders.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlarith.config import CheckpointConfig

COMPLETE = "COMPLETE"
"""Marker file: written last, fsync'd; a checkpoint folder without it is not a checkpoint."""
STATE_FILE = "rlarith_state.json"
"""The save policy's state inside each checkpoint (``SavePolicy.state_dict`` plus what the trainer adds)."""
REWARD_METRICS = ("exact", "total", "smoothed")
EMA_ALPHA = 0.1
"""Weight of the newest step in the ``smoothed`` reward."""

# Canonical names only ("checkpoint-007" is not step 7), so a step maps to exactly one folder.
_CHECKPOINT_NAME = re.compile(r"checkpoint-(0|[1-9][0-9]*)")
# An old checkpoint being replaced by a re-save of the same step is parked under this prefix.
_TRASH_PREFIX = ".trash-"


# --------------------------------------------------------------------------------------------- paths


def checkpoints_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints live.

    >>> checkpoints_dir(Path("runs/x")).as_posix()
    'runs/x/checkpoints'
    """
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint at global step ``step``.

    >>> checkpoint_path(Path("runs/x"), 40).as_posix()
    'runs/x/checkpoints/checkpoint-40'
    """
    return checkpoints_dir(run_dir) / f"checkpoint-{step}"


def staging_dir(run_dir: Path) -> Path:
    """Where the Trainer writes a checkpoint before ``seal`` moves it into place.

    >>> staging_dir(Path("runs/x")).as_posix()
    'runs/x/checkpoints/.staging'
    """
    return checkpoints_dir(run_dir) / ".staging"


def step_of(path: Path | str) -> int | None:
    """The global step in a checkpoint folder's name; None when the name is not ``checkpoint-<step>``.

    >>> step_of("runs/x/checkpoints/checkpoint-40"), step_of("checkpoint-007"), step_of(".trash-checkpoint-4")
    (40, None, None)
    """
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def valid_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every valid checkpoint (a ``checkpoint-<step>`` folder holding ``COMPLETE``),
    sorted by step. Staging folders, half-deleted folders and replaced ones are never listed."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = step_of(path)
        if step is not None and _is_valid(path):
            found.append((step, path))
    return sorted(found)


def latest_valid(run_dir: Path) -> Path | None:
    """The valid checkpoint with the highest step (where training resumes), or None."""
    valid = valid_checkpoints(run_dir)
    return valid[-1][1] if valid else None


def load_policy_state(checkpoint: Path) -> dict[str, Any]:
    """The state ``seal`` wrote into ``checkpoint`` (for ``SavePolicy.load_state_dict`` on resume)."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


# ------------------------------------------------------------------------------------------ retention


def retained(steps: list[int], best_step: int | None, keep_best: bool = True) -> set[int]:
    """The steps to keep among the valid checkpoints ``steps``: the first, the second-to-last and the most
    recent, plus ``best_step`` when ``keep_best`` and it is one of them. Non-empty for non-empty input.

    >>> sorted(retained([20, 40, 60, 80], best_step=None))
    [20, 60, 80]
    >>> sorted(retained([20, 40, 60, 80], best_step=40)), sorted(retained([20, 40, 60, 80], 40, False))
    ([20, 40, 60, 80], [20, 60, 80])
    >>> sorted(retained([20], best_step=None)), retained([], best_step=None)
    ([20], set())
    """
    ordered = sorted(set(steps))
    if not ordered:
        return set()
    keep = {ordered[0], *ordered[-2:]}
    if keep_best and best_step in ordered:
        keep.add(best_step)
    return keep


def human_bytes(n: int) -> str:
    """A byte count in binary units, for screen reports.

    >>> human_bytes(512), human_bytes(1536), human_bytes(3 * 2**30)
    ('512 B', '1.5 KiB', '3.0 GiB')
    """
    size, units = float(n), ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{n} B" if units[0] == "B" else f"{size:.1f} {units[0]}"


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


@dataclass
class PruneReport:
    """What ``prune`` did; ``str(report)`` is the screen report.

    >>> root = Path("runs/x/checkpoints")
    >>> print(PruneReport([(root / "checkpoint-40", 3 * 2**20)], [root / "checkpoint-20", root / "checkpoint-60"]))
    pruned 1 checkpoint, freed 3.0 MiB:
      removed runs/x/checkpoints/checkpoint-40 (3.0 MiB)
      kept checkpoint-20, checkpoint-60 in runs/x/checkpoints
    """

    removed: list[tuple[Path, int]] = field(default_factory=list)
    """``(folder, bytes freed)`` of every checkpoint deleted."""
    kept: list[Path] = field(default_factory=list)
    """The valid checkpoints that remain, by step."""
    failed: list[tuple[Path, str]] = field(default_factory=list)
    """``(folder, error)`` of deletions that failed midway: no longer valid, ``clean_staging`` retries."""

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.removed)

    def __str__(self) -> str:
        n = len(self.removed)
        if n:
            lines = [f"pruned {n} checkpoint{'s' * (n != 1)}, freed {human_bytes(self.bytes_freed)}:"]
        else:
            lines = ["pruned nothing:"]
        lines += [f"  removed {path.as_posix()} ({human_bytes(size)})" for path, size in self.removed]
        lines += [f"  FAILED to remove {path.as_posix()}: {error}" for path, error in self.failed]
        if self.kept:
            names = ", ".join(path.name for path in self.kept)
            lines.append(f"  kept {names} in {self.kept[0].parent.as_posix()}")
        return "\n".join(lines)


def prune(run_dir: Path, best_step: int | None, keep_best: bool = True) -> PruneReport:
    """Delete every valid checkpoint that ``retained`` does not keep. Each deletion removes ``COMPLETE``
    first, so a deletion cut short leaves an invalid folder (cleaned at next start), never a broken
    checkpoint that looks valid. The latest valid checkpoint is always kept, so never the only one."""
    valid = valid_checkpoints(run_dir)
    keep = retained([step for step, _ in valid], best_step, keep_best)
    report = PruneReport()
    for step, path in valid:
        if step in keep:
            report.kept.append(path)
            continue
        size = tree_bytes(path)
        try:
            _remove(path)
        except OSError as error:  # e.g. NFS busy files: not worth crashing a training run over
            report.failed.append((path, str(error)))
        else:
            report.removed.append((path, size))
    return report


# --------------------------------------------------------------------------------------- durability


def seal(staged: Path, final: Path, state: dict[str, Any]) -> None:
    """Make the complete checkpoint folder ``staged`` (written by the HF Trainer) the valid checkpoint
    ``final``: write ``STATE_FILE``, fsync every file and folder, write and fsync ``COMPLETE`` (step, time
    and the size of every file), rename ``staged`` to ``final`` and fsync the parents.

    If ``final`` exists (a re-run of the same step), the old one stays valid until the new one is sealed:
    it is renamed to ``.trash-<name>``, the new one renamed in, then the trash deleted. A crash between
    the two renames leaves the old one under the trash name, and ``clean_staging`` puts it back.
    ``staged`` and ``final`` must be on the same filesystem (``os.rename`` is only atomic there).
    """
    staged, final = Path(staged), Path(final)
    if not staged.is_dir():
        raise FileNotFoundError(f"staged checkpoint {staged} is not a folder")
    (staged / COMPLETE).unlink(missing_ok=True)  # re-sealing: valid only once everything is on disk again
    _write_durable(staged / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    files = _fsync_tree(staged)
    marker = {"step": step_of(final), "time": _now(), "files": files}
    _write_durable(staged / COMPLETE, json.dumps(marker, indent=2, sort_keys=True) + "\n")
    _fsync_dir(staged)

    final.parent.mkdir(parents=True, exist_ok=True)
    trash = final.parent / (_TRASH_PREFIX + final.name)
    if final.exists() and not _is_valid(final):
        _remove(final)  # the remains of a cut-short deletion: nothing worth keeping
    if final.exists():
        if trash.exists():
            _remove(trash)  # left by an earlier interrupted replace; final is the valid one
        os.rename(final, trash)
        _fsync_dir(final.parent)
    os.rename(staged, final)
    _fsync_dir(final.parent)
    _fsync_dir(staged.parent)
    if trash.exists():
        _remove(trash)


def clean_staging(run_dir: Path) -> list[Path]:
    """Remove the leftovers of interrupted saves and deletions; returns what was removed. Call at start,
    on rank 0, before any rank looks for a checkpoint to resume from.

    - ``.trash-checkpoint-<step>`` (an interrupted replace): deleted when ``checkpoint-<step>`` is valid;
      otherwise it is the old checkpoint, still complete, and is renamed back (not listed as removed);
    - everything in ``.staging/`` (checkpoints the Trainer was writing, or had written but not sealed);
    - ``checkpoint-<step>`` folders without ``COMPLETE`` (deletions cut short). Valid ones are never touched.
    """
    root = checkpoints_dir(run_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for trash in sorted(root.glob(_TRASH_PREFIX + "checkpoint-*")):
        final = root / trash.name[len(_TRASH_PREFIX) :]
        if step_of(final) is not None and not _is_valid(final) and _is_valid(trash):
            if final.exists():
                _remove(final)
                removed.append(final)
            os.rename(trash, final)
            _fsync_dir(root)
        else:
            _remove(trash)
            removed.append(trash)
    staging = staging_dir(run_dir)
    if staging.is_dir():
        for path in sorted(staging.iterdir()):
            _remove(path)
            removed.append(path)
    for path in sorted(root.iterdir()):
        if step_of(path) is not None and not _is_valid(path):
            _remove(path)
            removed.append(path)
    return removed


def _is_valid(folder: Path) -> bool:
    return folder.is_dir() and (folder / COMPLETE).is_file()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # A folder's fsync makes the names in it (created, renamed, deleted) durable, not just file contents.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> dict[str, int]:
    """fsync every regular file and folder under ``root``; returns ``{relative path: bytes}``."""
    files: dict[str, int] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
                files[path.relative_to(root).as_posix()] = os.fstat(f.fileno()).st_size
        _fsync_dir(Path(dirpath))
    return files


def _remove(path: Path) -> None:
    """Delete a file or folder; a folder loses ``COMPLETE`` first (made durable), so a deletion cut short
    never leaves a folder that looks valid."""
    if path.is_dir() and not path.is_symlink():
        marker = path / COMPLETE
        if marker.exists():
            marker.unlink()
            _fsync_dir(path)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- policy


def ema_update(previous: float | None, value: float, alpha: float = EMA_ALPHA) -> float:
    """Exponential moving average; the first value starts it.

    >>> ema_update(None, 1.0), ema_update(1.0, 0.0), round(ema_update(0.5, 1.0), 6)
    (1.0, 0.9, 0.55)
    """
    return value if previous is None else (1 - alpha) * previous + alpha * value


def best_saved(history: list[dict[str, Any]], metric: str) -> tuple[int, float] | None:
    """``(step, reward)`` of the saved checkpoint with the highest ``metric`` reward (earliest on ties).

    >>> best_saved([{"step": 20, "reward": 0.2, "metric": "exact"}, {"step": 30, "reward": 0.4, "metric": "exact"},
    ...             {"step": 40, "reward": 0.9, "metric": "total"}, {"step": 50, "reward": 0.4, "metric": "exact"}],
    ...            "exact")
    (30, 0.4)
    """
    best = None
    for entry in history:
        reward = entry.get("reward")
        if entry.get("metric", metric) != metric or not _usable(reward):
            continue
        if best is None or reward > best[1]:
            best = (int(entry["step"]), float(reward))
    return best


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


@dataclass
class SavePolicy:
    """The notebook's save policy and its state (restored on resume).

    >>> policy = SavePolicy(save_every=20, reward_threshold=0.3)
    >>> policy.observe(1, exact=0.1, total=0.1)
    ['new best exact=0.100 (previous best: none)']
    >>> policy.observe(2, exact=0.05, total=0.05)
    []
    >>> policy.observe(20, exact=0.35, total=0.35)  # doctest: +NORMALIZE_WHITESPACE
    ['step 20 is a multiple of save_every=20', 'reward exact=0.350 exceeds reward_threshold=0.3',
     'new best exact=0.350 (previous best 0.100 at step 1)']
    """

    save_every: int
    reward_threshold: float
    save_on_best: bool = True
    keep_best: bool = True
    reward_metric: str = "exact"
    # State. best_reward is the best value observe() has seen (what "new best" compares with); best_step
    # is the best among *saved* checkpoints (what retention keeps): a best seen but never saved must not
    # make retention keep a checkpoint that is not the best one.
    best_reward: float | None = None
    best_reward_step: int | None = None
    best_step: int | None = None
    ema: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per save: ``{"step", "reward", "metric", "reasons", "time"}``."""
    _last: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.save_every < 1:
            raise ValueError(f"save_every must be at least 1; got {self.save_every}")
        if self.reward_metric not in REWARD_METRICS:
            raise ValueError(
                f"reward_metric must be one of {', '.join(REWARD_METRICS)}; got {self.reward_metric!r}"
            )

    @classmethod
    def from_config(cls, config: CheckpointConfig) -> SavePolicy:
        return cls(
            config.save_every,
            config.reward_threshold,
            config.save_on_best,
            config.keep_best,
            config.reward_metric,
        )

    def current(self, exact: float, total: float) -> float:
        """This step's ``reward_metric`` value, after ``observe`` (for ``smoothed``: the updated EMA)."""
        if self.reward_metric == "smoothed":
            return math.nan if self.ema is None else self.ema
        return exact if self.reward_metric == "exact" else total

    def observe(self, step: int, exact: float, total: float) -> list[str]:
        """Feed one step's mean exact-match and weighted total reward; returns the reasons to save now
        (empty: no save). Call once per step, at generation boundaries."""
        if _usable(exact):  # a step without scored completions (NaN) must not poison the average
            self.ema = ema_update(self.ema, exact)
        value, name = self.current(exact, total), self.reward_metric
        reasons = []
        if step % self.save_every == 0:
            reasons.append(f"step {step} is a multiple of save_every={self.save_every}")
        exceeds = _usable(value) and value > self.reward_threshold
        if exceeds:
            reasons.append(f"reward {name}={value:.3f} exceeds reward_threshold={self.reward_threshold:g}")
        previous, previous_step = self.best_reward, self.best_reward_step
        new_best = _usable(value) and (previous is None or value > previous)
        if new_best:
            self.best_reward, self.best_reward_step = value, step
            if self.save_on_best:
                reasons.append(f"new best {name}={value:.3f} ({_previous_best(previous, previous_step)})")
        self._last = {
            "step": step,
            "reward": value,
            "reasons": list(reasons),
            "exceeds": exceeds,
            "new_best": new_best,
            "previous": previous,
            "previous_step": previous_step,
        }
        return reasons

    def record_save(self, step: int, reward: float, reasons: list[str]) -> None:
        """Note a save of ``step`` with its ``reward_metric`` value (see ``current``) and reasons; updates
        ``history`` and ``best_step``. A re-save of the same step replaces its entry."""
        self.history = _with_save(self.history, step, reward, self.reward_metric, reasons)
        best = best_saved(self.history, self.reward_metric)
        self.best_step = best[0] if best else None
        if self._last is not None and self._last["step"] == step:
            self._last["recorded"] = True

    def report(self, step: int, reasons: list[str]) -> str:
        """The screen report for a save at ``step``. When a reward caused it, the last line names the
        reward, the old best and the new (or the best that still stands)."""
        lines = [f"checkpoint-{step} saved:"]
        lines += [f"  - {reason}" for reason in reasons] or ["  - no policy reason (saved on request)"]
        last, name = self._last, self.reward_metric
        if last is not None and last["step"] == step and (last["exceeds"] or last["new_best"]):
            value = last["reward"]
            if last["new_best"]:
                old = (
                    "none"
                    if last["previous"] is None
                    else f"{last['previous']:.3f} (step {last['previous_step']})"
                )
                lines.append(f"  reward {name}: old best {old}, new best {value:.3f} (step {step})")
            else:
                best = f"{self.best_reward:.3f} (step {self.best_reward_step})"
                lines.append(f"  reward {name}: {value:.3f}, best stays {best}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """The state to store in a checkpoint (JSON-serialisable). Taken between ``observe`` and
        ``record_save`` of a save, it already counts that save: the checkpoint it is stored in exists
        exactly when the save succeeded, so a run resumed from it must know it was saved."""
        history = [dict(entry) for entry in self.history]
        last = self._last
        if last is not None and last["reasons"] and not last.get("recorded"):
            history = _with_save(history, last["step"], last["reward"], self.reward_metric, last["reasons"])
        best = best_saved(history, self.reward_metric)
        return {
            "reward_metric": self.reward_metric,
            "best_reward": self.best_reward,
            "best_reward_step": self.best_reward_step,
            "best_step": best[0] if best else None,
            "ema": self.ema,
            "history": history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output (unknown keys, e.g. the trainer's, are ignored). When the
        config's ``reward_metric`` changed since, the best restarts: rewards of two metrics do not compare."""
        same_metric = state.get("reward_metric", self.reward_metric) == self.reward_metric
        self.best_reward = state.get("best_reward") if same_metric else None
        self.best_reward_step = state.get("best_reward_step") if same_metric else None
        self.ema = state.get("ema")
        self.history = [dict(entry) for entry in state.get("history", [])]
        best = best_saved(self.history, self.reward_metric)
        self.best_step = best[0] if best else None
        self._last = None


def _with_save(
    history: list[dict[str, Any]], step: int, reward: float, metric: str, reasons: list[str]
) -> list[dict[str, Any]]:
    entry = {"step": step, "reward": reward, "metric": metric, "reasons": list(reasons), "time": _now()}
    return sorted([e for e in history if e["step"] != step] + [entry], key=lambda e: e["step"])


def _previous_best(previous: float | None, previous_step: int | None) -> str:
    return (
        "previous best: none" if previous is None else f"previous best {previous:.3f} at step {previous_step}"
    )
