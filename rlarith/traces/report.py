"""What people look at: the summary (``rlarith traces summary``), the per-step table, exports, the plot."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rlarith.traces.format import TraceError

if TYPE_CHECKING:
    from rlarith.traces.reader import Traces


def summary(tr: Traces) -> dict:
    """Steps, samples, bytes on disk, compression ratio against JSONL of the same records and metrics
    (``json.dumps`` per line, as a plain logger writes them), and reward and accuracy by step."""
    default = tr.steps()
    every = tr.steps(all_attempts=True)
    jsonl = sum(len(json.dumps(r)) + 1 for r in tr.records(all_attempts=True))
    for r in tr.metrics(all_attempts=True).to_dict("records"):
        r = {k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}
        jsonl += len(json.dumps(r, default=lambda o: o.item())) + 1
    size = sum(s.size for s in tr.sources)
    return {
        "directory": str(tr.directory),
        "steps": int(default["step"].nunique()),
        "samples": int(default["count"].sum()),
        "samples_all_attempts": int(every["count"].sum()),
        "ranks": sorted({s.rank for s in tr.sources}),
        "attempts": list(dict.fromkeys(s.attempt for s in tr.sources)),  # chronological
        "shards": sum(s.sealed for s in tr.sources),
        "journals": sum(not s.sealed for s in tr.sources),
        "bytes": size,
        "jsonl_bytes": jsonl,
        "compression_ratio": jsonl / size if size else math.nan,
        "bytes_per_sample": size / max(int(every["count"].sum()), 1),
        "by_step": tr.by_step(),
    }


def by_step(tr: Traces) -> pd.DataFrame:
    """Per step of the default view: samples, the mean of each reward column, accuracy (mean of
    reward/exact, else parsed == truth), extraction failures (share of parsed None), mean completion
    length (tokens; UTF-8 bytes without completion_ids). Reads no text."""
    cols = tr.columns
    want = [c for c in cols if c.startswith("reward")] + [c for c in ("parsed", "truth") if c in cols]
    if cols.get("completion_ids") == "ids":
        want.append("len(completion_ids)")
    elif cols.get("completion") == "text":
        want.append("len(completion)")
    df = tr.frame(columns=want)
    out = pd.DataFrame({"step": df["step"]})
    for c in want:
        if c.startswith("reward"):
            out[c] = df[c]
    if "reward/exact" in df:
        out["accuracy"] = df["reward/exact"]
    elif "parsed" in df and "truth" in df:
        out["accuracy"] = (df["parsed"] == df["truth"]).fillna(False).astype(float)
    if "parsed" in df:
        out["extraction_failure"] = df["parsed"].isna().astype(float)
    for c in ("len(completion_ids)", "len(completion)"):
        if c in df:
            out["completion_len"] = df[c].astype(float)
    g = out.groupby("step")
    res = g.mean()
    res.insert(0, "samples", g.size())
    return res.reset_index()


def export(tr: Traces, out: str | Path, fmt: str, all_attempts: bool = False) -> Path:
    """Write the view as Parquet (one table) or JSONL (one record per line, as ``json.dumps`` writes it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with builtins.open(out, "w") as fh:
            for r in tr.records(all_attempts=all_attempts):
                fh.write(json.dumps(r) + "\n")
    elif fmt == "parquet":
        df = tr.frame(all_attempts=all_attempts)
        for c in df.columns:  # ints beyond int64 cannot be Parquet integers: keep them exactly, as text
            if df[c].dtype == object and tr.columns.get(c) == "int":
                df[c] = [None if v is None else str(v) for v in df[c]]
        df.to_parquet(out, index=False)
    else:
        raise TraceError(f"unknown export format {fmt!r}; use parquet or jsonl")
    return out


def plot(tr: Traces, out: str | Path) -> Path:
    """A PNG of reward components, accuracy, extraction failures and completion length over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = tr.by_step()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax = axes[0, 0]
    for c in [c for c in s.columns if c.startswith("reward")]:
        ax.plot(s["step"], s[c], label=c)
    ax.set_title("reward components (mean)")
    ax.legend(fontsize=8)
    for ax, c, title in (
        (axes[0, 1], "accuracy", "accuracy (mean of reward/exact)"),
        (axes[1, 0], "extraction_failure", "extraction failure rate (parsed is None)"),
        (axes[1, 1], "completion_len", "completion length (tokens, mean)"),
    ):
        if c in s:
            ax.plot(s["step"], s[c])
        ax.set_title(title)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"traces: {tr.directory}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_summary(s: dict, rows: int = 40) -> str:
    """The summary as text; at most ``rows`` evenly spaced steps of the per-step table (0: all)."""
    lines = [
        f"traces: {s['directory']}",
        f"steps: {s['steps']:,}  samples: {s['samples']:,} (all attempts: {s['samples_all_attempts']:,})",
        f"ranks: {', '.join(map(str, s['ranks'])) or '-'}  attempts: {', '.join(s['attempts']) or '-'}",
        f"files: {s['shards']:,} shards, {s['journals']:,} journals  bytes on disk: {s['bytes']:,} "
        f"({s['bytes_per_sample']:.1f} per sample)",
        f"compression: {s['compression_ratio']:.1f}x smaller than JSONL of the same records ({s['jsonl_bytes']:,} bytes)",
    ]
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
