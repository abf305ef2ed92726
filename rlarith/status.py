"""``rlarith status RUN``: what a user asks the morning after. Every attempt (when, where, which steps, why
it ended), the latest valid checkpoint and the last metrics line. Reads the run directory only; no torch."""

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
        if row.get("ended") == "failed":
            ended += f" (exit {row.get('exit')})"
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
    failed = [r for r in rows if r.get("ended") == "failed" and r.get("detail")]
    if failed:
        lines.append("the last failure said:")
        lines += ["  " + line for line in failed[-1]["detail"].splitlines()[-8:]]
    return "\n".join(lines) + "\n"
