"""``rlarith status RUN``: what a user asks the morning after. Every attempt (when, where, which steps, why
it ended), the latest valid checkpoint, the last metrics line, and where the run stands now: the latest
attempt's ending in words, why, and what to do next. Reads the run directory only; no torch."""

from __future__ import annotations

from pathlib import Path

from rlarith import attempts, metrics
from rlarith.checkpoints import valid_checkpoints


def last_metrics(run_dir: Path) -> dict | None:
    """The last logged training step of ``metrics.jsonl`` (not the end-of-training summary)."""
    steps = [r for r in metrics.read(run_dir) if "loss" in r]
    return steps[-1] if steps else None


def report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() and not (run_dir / attempts.RECORD).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml, no attempts.jsonl)")
    lines = [f"run {run_dir}"]
    rows = attempts.merged(run_dir)
    if rows:
        lines.append(
            "attempt        host          start                      end                        steps      ended"
        )
    for row in rows:
        steps = f"{row.get('first_step', '?')}-{row.get('last_step', '?')}"
        ended = row.get("ended") or ("running, or killed without warning" if "end" not in row else "?")
        if row.get("ended") in ("failed", "failed-requeued") and row.get("exit") is not None:
            ended += f" (rank {row.get('rank', 0)}, exit {row.get('exit')})"
        lines.append(
            f"{row['attempt']:<14} {row.get('host', '?')[:13]:<13} {row.get('start', '?'):<26} "
            f"{row.get('end', '-'):<26} {steps:<10} {ended}"
        )
    if not rows:
        lines.append("no attempts recorded (started with `rlarith train`, not `rlarith submit`)")
    valid = valid_checkpoints(run_dir)
    lines.append(
        f"latest checkpoint: {valid[-1][1]} ({len(valid)} valid)" if valid else "latest checkpoint: none yet"
    )
    metrics = last_metrics(run_dir)
    if metrics:
        shown = {
            k: v for k, v in metrics.items() if k in ("time", "step", "loss", "reward", "rewards/exact/mean")
        }
        lines.append(
            "last metrics: "
            + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        )
    if rows:
        lines += latest(run_dir, rows[-1])
    return "\n".join(lines) + "\n"


RESUMABLE = ("cancelled", "stopped", "timeout-limit", "requeue-failed", "failed")
"""Endings after which nothing restarts the run by itself: the user submits again."""


def latest(run_dir: Path, row: dict) -> list[str]:
    """The latest attempt in words: where the run stands now, and what to do next. An older attempt's
    failure is history (it is in the table), not the state."""
    name = row["attempt"]
    failures = row.get("ranks") or []
    if "end" not in row:
        if failures:
            return [
                f"now: attempt {name} failed: {attempts.failure_text(failures[0])}; its rank 0 was killed "
                "before it recorded the end (SLURM ended the job, or restarts it after a node failure)"
            ] + ["  " + line for line in (failures[0].get("detail") or "").splitlines()[-8:]]
        return [
            f"now: attempt {name} is running, or was killed without warning (node failure, SIGKILL): "
            f"`squeue -j {row.get('job_id', '?')}` tells which"
        ]
    ended = row.get("ended", "?")
    out = [f"now: attempt {name} ended: {attempts.ENDINGS.get(ended, ended)}"]
    if row.get("reason"):
        out.append(f"  why: {row['reason']}")
    if ended in ("failed", "failed-requeued", "lost") and row.get("detail"):
        first, *rest = row["detail"].splitlines()
        out.append(f"  the failure: {first}")
        out += ["    " + line for line in rest[-6:]]
    if ended in RESUMABLE:
        out.append(
            f"  to resume from the latest checkpoint: rlarith submit -c {run_dir / 'config.yaml'} --wait"
        )
    return out
