"""Checkpoints: how a save becomes valid, which saves are trusted, and which are kept.

When to save is decided by the save policy (rlarith.save_policy); this module takes it from there:

- **Valid** (``seal``): the HF Trainer writes a checkpoint into ``checkpoints/.staging/``; ``seal`` adds
  the policy state (``rlarith_state.json``), refuses a folder that lacks what the trainer requires,
  reads every file once to record its size and checksum (``CHECKSUMS.json``, rlarith.manifest) and fsync
  it, writes ``COMPLETE`` last and renames the folder to ``checkpoints/checkpoint-<step>``. Readers trust
  only folders that hold ``COMPLETE`` (``valid_checkpoints``), so a crash at any moment leaves the old
  state or the new, never a half-written checkpoint that looks whole. ``clean_staging`` (at start, rank
  0) removes what interrupted saves and deletions left behind.
- **Trusted** (``latest_verified``, at start, rank 0): the checkpoint about to be resumed is checked
  against its checksums; a damaged one (truncated, altered, a file missing) is moved aside to
  ``checkpoints/.bad-<step>-<file>-<reason>`` (never deleted: it is evidence) and the previous valid one
  is tried. ``rlarith checkpoints verify RUN`` checks them all.
- **Kept** (``retained``, ``prune``): after every save only the first, the second-to-last and the most
  recent valid checkpoints remain, plus the best saved one when ``keep_best``. The first is the run's
  origin; the second-to-last is the fallback should the latest turn out bad. ``prune`` deletes the rest
  (never the last checkpoint known good) and its ``PruneReport`` says what was removed, the space freed
  and what remains.

A checkpoint is a full training state (weights, optimizer, scheduler, RNG, trainer and policy state), so
training restarts from any valid one. This module never imports torch: it only moves folders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlarith import manifest
from rlarith.durable import fsync_path
from rlarith.manifest import Problem, Required

if TYPE_CHECKING:
    from rlarith.config import RunConfig

COMPLETE = "COMPLETE"
"""Marker file: written last, fsync'd; a checkpoint folder without it is not a checkpoint."""
STATE_FILE = "rlarith_state.json"
"""The save policy's state inside each checkpoint (``SavePolicy.state_dict`` plus what the trainer adds)."""

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


def recorded_config(checkpoint: Path) -> RunConfig | None:
    """The run's config as sealed into ``checkpoint`` (``STATE_FILE``'s ``config``: the trainer stores
    ``flat(cfg)`` with every save); None when it holds none (sealed by an older rlarith) or cannot be read."""
    from rlarith.config import ConfigError, from_flat

    try:
        record = load_policy_state(checkpoint).get("config")
        return from_flat(record, f"{checkpoint / STATE_FILE}") if isinstance(record, dict) else None
    except (OSError, ValueError, AttributeError, ConfigError):
        return None


def run_config(run_dir: Path, checkpoint: Path | None = None) -> tuple[RunConfig, str | None]:
    """The config of a run directory and a note (None when all is well): ``config.yaml``, or, when that is
    damaged (empty after a crash, cut short), the copy sealed into ``checkpoint`` (default: the latest valid
    checkpoint that holds one), the note saying so and how to restore the file. With neither, the
    ``ConfigDamaged`` error names the fix. Never the defaults."""
    from rlarith.config import RUN_CONFIG, ConfigDamaged, load_run_config

    run_dir = Path(run_dir)
    try:
        return load_run_config(run_dir), None
    except ConfigDamaged as err:
        damaged = err
    candidates = (
        [Path(checkpoint)] if checkpoint is not None else [p for _, p in reversed(valid_checkpoints(run_dir))]
    )
    for path in candidates:
        cfg = recorded_config(path)
        if cfg is not None:
            note = (
                f"{damaged.path} {damaged.why}: using the config sealed into {path} instead. Restore the file "
                f"with `rlarith config --run {run_dir} > {damaged.path}` (the next `rlarith train` of this "
                "run rewrites it too)."
            )
            return cfg, note
    raise ConfigDamaged(
        damaged.path,
        damaged.why,
        "No valid checkpoint of the run holds a copy of its config to use instead. Restore it from the YAML and "
        f"overrides the run was started with: `rlarith config -c FILE [key=value ...] > {run_dir / RUN_CONFIG}`.",
    ) from None


def resumes_from(run_dir: Path) -> str:
    """Where the next start of the run resumes, as a sentence for an error message."""
    latest = latest_valid(run_dir)
    if latest is None:
        return "There is no valid checkpoint yet: the next start begins from the model."
    return f"The latest valid checkpoint, {latest.name}, is intact and the next start resumes from it."


def intact_after_failed_save(run_dir: Path, step: int) -> str:
    """What a save of ``step`` that failed before its seal leaves intact, in sentences for the user."""
    return (
        f"checkpoint-{step} was never sealed, so it is not a checkpoint (its files are removed at the next "
        f"start). {resumes_from(run_dir)}"
    )


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


def prune(
    run_dir: Path, best_step: int | None, keep_best: bool = True, verified: int | None = None
) -> PruneReport:
    """Delete every valid checkpoint that ``retained`` does not keep. Each deletion removes ``COMPLETE``
    first, so a deletion cut short leaves an invalid folder (cleaned at next start), never a broken
    checkpoint that looks valid. The latest valid checkpoint is always kept, so never the only one.

    Retention never deletes the last checkpoint known to be good: ``verified`` (the step of the latest
    one whose checksums were read, e.g. the one just sealed) is always kept, and a checkpoint whose file
    sizes no longer match its record (a ``stat`` each, no reading) neither counts towards retention nor
    is deleted: an older good one stays rather than be pruned in favour of a damaged one."""
    valid = valid_checkpoints(run_dir)
    damaged = {step for step, path in valid if step != verified and not verify(path, digests=False).ok}
    keep = retained([step for step, _ in valid if step not in damaged], best_step, keep_best)
    keep |= damaged | ({verified} if verified is not None else set())
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


# ------------------------------------------------------------------------------------- verification

_BAD_PREFIX = ".bad-"


@dataclass
class MovedAside:
    """A checkpoint that failed verification and was renamed out of the way (kept as evidence)."""

    step: int
    path: Path
    """Where it is now: ``checkpoints/.bad-<step>-<file>-<reason>``."""
    problems: list[Problem]

    def __str__(self) -> str:
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return (
            f"checkpoint-{self.step} is damaged: {self.problems[0]}{more}; "
            f"moved aside to {self.path.as_posix()}, falling back to the previous valid checkpoint"
        )


@dataclass
class Resume:
    """What ``latest_verified`` found: the checkpoint to resume from (None: start from the model), the
    damaged ones it moved aside on the way, and what verifying the chosen one cost."""

    checkpoint: Path | None
    moved: list[MovedAside] = field(default_factory=list)
    verified: manifest.Verified | None = None


def verify(checkpoint: Path, digests: bool = True) -> manifest.Verified:
    """Is the sealed ``checkpoint`` still what was sealed? (``rlarith.manifest.verify``)"""
    return manifest.verify(checkpoint, digests=digests)


def move_aside(checkpoint: Path, problems: list[Problem]) -> Path:
    """Rename a damaged checkpoint to ``.bad-<step>-<first problem>`` beside it: no longer listed as
    valid, never deleted (it is evidence, and retention and ``clean_staging`` leave ``.bad-*`` alone)."""
    checkpoint = Path(checkpoint)
    label = problems[0].slug if problems else "unverified"
    base = checkpoint.parent / f"{_BAD_PREFIX}{step_of(checkpoint)}-{label}"
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    os.rename(checkpoint, dest)
    fsync_path(checkpoint.parent)
    return dest


def moved_aside(run_dir: Path) -> list[Path]:
    """The damaged checkpoints moved aside so far (``.bad-*``), by name."""
    root = checkpoints_dir(run_dir)
    return sorted(root.glob(_BAD_PREFIX + "*")) if root.is_dir() else []


def latest_verified(run_dir: Path) -> Resume:
    """The latest valid checkpoint whose files all match their checksums; every newer one that does not
    is moved aside (``move_aside``). Call on rank 0 only, before the ranks look for a checkpoint."""
    resume = Resume(None)
    for step, path in reversed(valid_checkpoints(run_dir)):
        result = verify(path)
        if result.ok:
            resume.checkpoint, resume.verified = path, result
            break
        resume.moved.append(MovedAside(step, move_aside(path, result.problems), result.problems))
    return resume


def verify_report(run_dir: Path) -> tuple[str, bool]:
    """``rlarith checkpoints verify RUN``: every valid checkpoint read in full against its checksums, one
    line each, plus the ones moved aside earlier. Returns ``(text, all good)``; changes nothing."""
    from rlarith.config import ConfigError

    run_dir = Path(run_dir)
    if not checkpoints_dir(run_dir).is_dir():
        raise ConfigError(
            f"{str(run_dir)!r} has no checkpoints/ folder: pass a run directory (runs/<name>) that has saved."
        )
    lines, bad = [], 0
    valid = valid_checkpoints(run_dir)
    for _, path in valid:
        result = verify(path)
        if result.ok:
            how = "checksums" if result.checksums else "sizes only: sealed before checksums"
            lines.append(
                f"{path.name}: ok ({result.files} files, {human_bytes(result.bytes)}, {how}, "
                f"{result.seconds:.2f} s)"
            )
        else:
            bad += 1
            lines.append(f"{path.name}: DAMAGED: " + "; ".join(str(p) for p in result.problems))
    for path in moved_aside(run_dir):
        lines.append(f"{path.name}: moved aside earlier (damaged; kept as evidence)")
    summary = f"{len(valid)} checkpoint{'s' * (len(valid) != 1)} in {checkpoints_dir(run_dir)}: "
    summary += f"{len(valid) - bad} ok, {bad} damaged" if valid else "none"
    if bad:
        summary += " (the next start moves a damaged latest one aside and resumes from an older one)"
    return "\n".join([*lines, summary]), bad == 0


# --------------------------------------------------------------------------------------- durability


def seal(
    staged: Path,
    final: Path,
    state: dict[str, Any],
    required: Required = (),
    known: dict[str, dict] | None = None,
) -> None:
    """Make the complete checkpoint folder ``staged`` (written by the HF Trainer) the valid checkpoint
    ``final``: write ``STATE_FILE``, check that everything ``required`` is there (else
    ``FileNotFoundError``, nothing sealed), read every file once to record its size and checksum and fsync
    it (``CHECKSUMS.json``, rlarith.manifest), write and fsync ``COMPLETE`` (step, time and the size of
    every file), rename ``staged`` to ``final`` and fsync the parents.

    If ``final`` exists (a re-run of the same step), the old one stays valid until the new one is sealed:
    it is renamed to ``.trash-<name>``, the new one renamed in, then the trash deleted. A crash between
    the two renames leaves the old one under the trash name, and ``clean_staging`` puts it back.
    ``staged`` and ``final`` must be on the same filesystem (``os.rename`` is only atomic there).
    ``known``: checksum entries of files hashed and fsync'd as they were written (``manifest.record``).
    """
    staged, final = Path(staged), Path(final)
    if not staged.is_dir():
        raise FileNotFoundError(f"staged checkpoint {staged} is not a folder")
    (staged / COMPLETE).unlink(missing_ok=True)  # re-sealing: valid only once everything is on disk again
    _write_durable(staged / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    sums = manifest.record(staged, required, known=known)  # checksum and fsync, one read a file
    _fsync_dirs(staged)
    _write_durable(staged / manifest.CHECKSUMS, json.dumps(sums, indent=1, sort_keys=True) + "\n")
    files = {name: entry["size"] for name, entry in sums["files"].items()}
    marker = {"step": step_of(final), "time": _now(), "files": files}
    _write_durable(staged / COMPLETE, json.dumps(marker, indent=2, sort_keys=True) + "\n")
    fsync_path(staged)

    final.parent.mkdir(parents=True, exist_ok=True)
    trash = final.parent / (_TRASH_PREFIX + final.name)
    if final.exists() and not _is_valid(final):
        _remove(final)  # the remains of a cut-short deletion: nothing worth keeping
    if final.exists():
        if trash.exists():
            _remove(trash)  # left by an earlier interrupted replace; final is the valid one
        os.rename(final, trash)
        fsync_path(final.parent)
    os.rename(staged, final)
    fsync_path(final.parent)
    fsync_path(staged.parent)
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
            fsync_path(root)
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


def _fsync_dirs(root: Path) -> None:
    """fsync every folder under ``root`` (``manifest.record`` fsyncs the files as it reads them)."""
    for dirpath, _, _ in os.walk(root):
        fsync_path(Path(dirpath))


def _remove(path: Path) -> None:
    """Delete a file or folder; a folder loses ``COMPLETE`` first (made durable), so a deletion cut short
    never leaves a folder that looks valid."""
    if path.is_dir() and not path.is_symlink():
        marker = path / COMPLETE
        if marker.exists():
            marker.unlink()
            fsync_path(path)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
