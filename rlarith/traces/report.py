"""What people look at: the summary as text (``rlarith traces summary``), exports, the plot. The numbers
come from rlarith.traces.reader's ``Traces`` (``summary``, ``by_step``); nothing there imports this."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pandas as pd

from rlarith.durable import atomic_path
from rlarith.traces.format import TraceError
from rlarith.traces.reader import Traces, missing_text


def export(tr: Traces, out: str | Path, fmt: str, all_attempts: bool = False) -> Path:
    """Write the view as Parquet (one table) or JSONL (one record per line, as ``json.dumps`` writes it),
    to a temporary name renamed when complete. Parquet: ``time`` is a UTC timestamp, and
    ``extraction_failure`` (bool) says where ``parsed`` is null because no answer was found."""
    out = Path(out)
    if fmt not in ("jsonl", "parquet"):
        raise TraceError(f"unknown export format {fmt!r}; use parquet or jsonl")
    with atomic_path(out) as tmp:
        if fmt == "jsonl":
            with builtins.open(tmp, "w") as fh:
                for r in tr.records(all_attempts=all_attempts):
                    fh.write(json.dumps(r) + "\n")
        else:
            df = tr.frame(all_attempts=all_attempts)
            df["time"] = pd.to_datetime(df["time"], unit="s", utc=True)
            if "parsed" in df:
                df.insert(
                    df.columns.get_loc("parsed") + 1, "extraction_failure", df["parsed"].isna().astype(bool)
                )
            for c in df.columns:  # ints beyond int64 cannot be Parquet integers: keep them exactly, as text
                if df[c].dtype == object and tr.columns.get(c) == "int":
                    df[c] = [None if v is None else str(v) for v in df[c]]
            df.to_parquet(tmp, index=False)
    return out


def default_output(tr: Traces, name: str) -> Path:
    """Where ``rlarith traces export|plot`` write by default: ``exports/`` beside the trace directory,
    which is ``<run>/exports/`` for a run's own ``<run>/traces``."""
    return tr.directory.parent / "exports" / name


def smoothing_window(steps: int) -> int:
    """Steps per rolling mean in plots: none up to 100 steps, then ~1/50 of the run (odd, centred)."""
    return 1 if steps <= 100 else (steps // 50) | 1


def plot(tr: Traces, out: str | Path) -> Path:
    """A PNG of reward components, accuracy, extraction failures and completion length over steps; a
    dashed line where each resume happened; long runs drawn per step (thin) and smoothed (thick)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = tr.by_step()
    window = smoothing_window(len(s))
    fig = Figure(figsize=(11, 11))
    FigureCanvasAgg(fig)  # no pyplot, no global backend: safe in a headless job
    axes = fig.subplots(4, 1, sharex=True)  # one column: each legend has the right margin to itself
    panels = [
        (axes[0], [c for c in s.columns if c.startswith("reward")], "reward (mean per step)"),
        (axes[1], ["accuracy"], "accuracy (share exact)"),
        (axes[2], ["extraction_failure"], "extraction failure rate"),
        (axes[3], ["completion_len"], "completion length\n(tokens, mean)"),
    ]
    resumes = tr.resumes()
    for ax, columns, ylabel in panels:
        for c in [c for c in columns if c in s]:
            if window > 1:
                line = ax.plot(s["step"], s[c], linewidth=0.6, alpha=0.35)[0]
                smooth = s[c].rolling(window, center=True, min_periods=1).mean()
                ax.plot(s["step"], smooth, color=line.get_color(), linewidth=1.6, label=c)
            else:
                ax.plot(s["step"], s[c], marker=".", label=c)
        for k, step in enumerate(resumes.values()):
            ax.axvline(step, color="0.3", linestyle="--", linewidth=0.9, label=None if k else "resume")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # beside the axis: a legend inside it can hide a line
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    axes[-1].set_xlabel("step")
    how = f"thick: rolling mean over {window} steps, thin: per step" if window > 1 else "per step"
    where = "; ".join(f"attempt {a} resumed from step {st}" for a, st in resumes.items()) or "no resumes"
    fig.suptitle(f"traces: {tr.directory}\n{how}; dashed: {where}", fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out


def format_summary(s: dict, rows: int = 40) -> str:
    """The summary as text; at most ``rows`` evenly spaced steps of the per-step table (0: all)."""
    resumes = ", ".join(f"{a} from step {st}" for a, st in s["resumes"].items())
    lines = [
        f"traces: {s['directory']}",
        f"steps: {s['steps']:,}  samples: {s['samples']:,} (all attempts: {s['samples_all_attempts']:,})",
        f"ranks: {', '.join(map(str, s['ranks'])) or '-'}  attempts: {', '.join(s['attempts']) or '-'}",
        f"resumes: {resumes or 'none'} (earlier attempts' steps after a resume point are superseded)",
        f"files: {s['shards']:,} shards, {s['journals']:,} journals  bytes on disk: {s['bytes']:,} "
        f"({s['bytes_per_sample']:.1f} per sample)",
    ]
    owner = s.get("owner") or {}
    if owner:
        lines.insert(1, f"run: {owner.get('run_dir')} (run id {owner.get('run_id')}; the folder's run.json)")
    if (
        owner
        and s.get("run_dir")
        and Path(str(owner.get("run_dir"))).resolve() != Path(s["run_dir"]).resolve()
    ):
        lines.append(
            f"NOTE this trace folder belongs to the run directory {owner.get('run_dir')}, not to {s['run_dir']} "
            "(a copy or a move of it): the steps above are the owner's"
        )
    if len(s.get("run_ids", [])) > 1:
        lines.append(
            f"NOTE run ids: {', '.join(s['run_ids'])}: a forced config change, or the steps of two runs mixed "
            "in one folder before rlarith checked whose a trace folder is (`--all-attempts` exports show each "
            "row's run_id)"
        )
    for path, reason in s["skipped"]:
        lines.append(f"SKIPPED {path}: {reason}")
    if s.get("missing"):
        run_dir = Path(s["run_dir"]) if s.get("run_dir") else None
        lines.append(f"MISSING {missing_text(s['missing'], Path(s['directory']), run_dir)}")
    table = s["by_step"]
    if len(table):
        if rows and len(table) > rows:
            picks = np.unique(np.linspace(0, len(table) - 1, rows).round().astype(int))
            lines.append(f"by step (every ~{len(table) // rows}th of {len(table)}; --rows 0 for all):")
            table = table.iloc[picks]
        else:
            lines.append("by step:")
        lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return "\n".join(lines)
