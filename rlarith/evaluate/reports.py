"""Results on disk and on screen: JSON and markdown per result, the accuracy-over-steps plot, and
``compare`` (several runs side by side). Every file is written to a temporary name and renamed."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlarith import metrics
from rlarith.config import ConfigError
from rlarith.durable import atomic_path, write_atomic
from rlarith.evaluate.scoring import ERROR_KINDS, EvalResult


def result_stem(result: EvalResult) -> str:
    """``val-step40`` for a run's checkpoint, ``val-<model dir name>`` for a bare model; sampled results
    get ``-k<samples>-t<temperature>`` so they never overwrite the greedy one (which ``compare`` reads)."""
    sampled = f"-k{result.samples}-t{result.temperature:g}" if result.temperature > 0 else ""
    if result.step is not None:
        return f"{result.split}-step{result.step}{sampled}"
    return f"{result.split}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(result.model).name)}{sampled}"


def markdown_table(results: Sequence[EvalResult]) -> str:
    """Scores, then the error breakdown, one row per result."""
    rows = [
        "| step | model | split | n x k | T | exact (95% CI) | exact, last | no answer | no answer, last "
        "| partial | reward |",
        "|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        step = "-" if r.step is None else str(r.step)
        flag = f" (contaminated: {r.contaminated})" if r.contaminated else ""
        flag += f" (unreadable traces: {len(r.unreadable_traces)})" if r.unreadable_traces else ""
        rows.append(
            f"| {step} | {Path(r.model).name}{flag} | {r.split} | {r.n} x {r.samples} | {r.temperature:g} "
            f"| {r.accuracy:.3f} [{r.ci95[0]:.3f}, {r.ci95[1]:.3f}] | {r.accuracy_last:.3f} "
            f"| {r.extraction_failure_rate:.3f} | {r.extraction_failure_rate_last:.3f} "
            f"| {r.partial_mean:.3f} | {r.mean_reward:.3f} |"
        )
    positions = sorted(
        {k for r in results for k in r.errors if k.startswith("digit_position_")}, key=lambda k: int(k[15:])
    )
    head = ["step", *ERROR_KINDS, *(f"wrong digit {k[15:]}" for k in positions)]
    rows += ["", "Errors (strict; wrong digit i: position i from the right, 0 = units):", ""]
    rows += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in results:
        cells = ["-" if r.step is None else str(r.step)]
        cells += [str(r.errors.get(k, 0)) for k in (*ERROR_KINDS, *positions)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_result(result: EvalResult, eval_dir: Path) -> Path:
    """``<stem>.json`` (with per-completion records) and ``<stem>.md``; returns the JSON path."""
    stem = result_stem(result)
    path = Path(eval_dir) / f"{stem}.json"
    write_atomic(path, json.dumps(result.to_dict(), indent=1) + "\n")
    write_atomic(path.with_suffix(".md"), markdown_table([result]))
    return path


def plot_over_steps(series: dict[str, list[EvalResult]], path: Path, title: str = "") -> None:
    """Held-out exact accuracy (with Wilson 95% bars) against the training step, one series per run; the
    caption says what is drawn (n, decoding, what the bars are)."""
    fig = _figure((7.5, 4.6))
    draw_over_steps(fig.add_subplot(), series, title=title)
    _save_figure(fig, path)


def describe(results: Sequence[EvalResult]) -> str:
    """What a series of results is: problems per point, split and decoding.

    >>> describe([EvalResult(400, 1, 0.0, "val", 1, "m", 0.5, (0.4, 0.6), 0.5, 0, 0, 0, 0, {})])
    'n=400 val problems per point, greedy decoding (T=0)'
    """
    ns = sorted({r.n for r in results})
    splits = "/".join(sorted({r.split for r in results}))
    decodings = sorted(
        {
            "greedy decoding (T=0)"
            if r.temperature == 0
            else f"sampled (T={r.temperature:g}, {r.samples} per problem)"
            for r in results
        }
    )
    return f"n={'/'.join(map(str, ns))} {splits} problems per point, {'; '.join(decodings)}"


def draw_over_steps(ax: Any, series: dict[str, list[EvalResult]], title: str = "", ylabel: str = "") -> None:
    """``plot_over_steps`` on a given matplotlib axis (``compare`` draws it beside the reward). Points are
    the scored checkpoints, each with its interval; the dotted line only joins them (retention keeps few
    checkpoints: a straight line between steps 1 and 195 is no measurement)."""
    everything = []
    for label, results in series.items():
        pts = sorted((r for r in results if r.step is not None), key=lambda r: r.step)
        everything += pts
        steps, acc = [r.step for r in pts], [r.accuracy for r in pts]
        bars = [[a - r.ci95[0] for a, r in zip(acc, pts)], [r.ci95[1] - a for a, r in zip(acc, pts)]]
        ax.errorbar(steps, acc, yerr=bars, fmt="o", linestyle=":", linewidth=1, capsize=3, label=label)
    ax.set(
        xlabel="training step", ylabel=ylabel or "held-out exact accuracy", ylim=(-0.02, 1.02), title=title
    )
    ax.grid(alpha=0.3)
    if everything:
        caption = (
            f"{describe(everything)}; bars: Wilson 95% interval over the problems; "
            "points: scored checkpoints (dotted lines only join them)"
        )
        ax.text(0, -0.16, caption, transform=ax.transAxes, fontsize=7, va="top", wrap=True)
    if ax.get_legend_handles_labels()[0]:  # beside the axis: inside it a legend can hide points
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)  # no pyplot, no global backend: safe in a headless job
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def load_results(run_dir: Path, split: str = "val") -> list[EvalResult]:
    """A run's saved greedy per-step results for ``split`` (``eval/<split>-step<k>.json``), by step."""
    out = []
    for path in (Path(run_dir) / "eval").glob(f"{split}-step*.json"):
        if re.fullmatch(rf"{split}-step\d+\.json", path.name):
            out.append(EvalResult.from_dict(json.loads(path.read_text())))
    return sorted(out, key=lambda r: r.step if r.step is not None else -1)


def compare(runs: Sequence[Path], out: Path, split: str = "val") -> str:
    """One markdown table and one plot (held-out accuracy and training reward over steps) across runs."""
    if len(set(Path(r).name for r in runs)) != len(runs):
        labels = [str(r) for r in runs]  # same names in different places: keep them apart
    else:
        labels = [Path(r).name for r in runs]
    rows = [
        f"| run | {split} points | base acc | latest step | latest acc (95% CI) | best acc (step) "
        "| n x k, T | train reward (last step) |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    fig = _figure((12, 4.2))
    ax_acc, ax_rew = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    missing = [str(r) for r in runs if not (Path(r) / "config.yaml").is_file()]
    if missing:
        raise ConfigError(
            f"no run at {', '.join(repr(m) for m in missing)} (no config.yaml there); pass run directories, "
            "e.g. runs/<name>."
        )
    anything, accuracy = False, {}
    for run, label in zip(runs, labels):
        results, history = load_results(Path(run), split), metrics.read(Path(run))
        anything |= bool(results or history)
        rewards = sorted(
            (m["step"], m["reward"]) for m in history if isinstance(m.get("reward"), (int, float))
        )
        last_reward = f"{rewards[-1][1]:.3f} ({rewards[-1][0]})" if rewards else "-"
        if results:
            base = next((r for r in results if r.step == 0), None)
            latest, best = results[-1], max(results, key=lambda r: r.accuracy)
            settings = sorted({f"{r.n} x {r.samples}, {r.temperature:g}" for r in results})
            rows.append(
                f"| {label} | {len(results)} | {'-' if base is None else f'{base.accuracy:.3f}'} "
                f"| {latest.step} | {latest.accuracy:.3f} [{latest.ci95[0]:.3f}, {latest.ci95[1]:.3f}] "
                f"| {best.accuracy:.3f} ({best.step}) | {'; '.join(settings)} | {last_reward} |"
            )
            accuracy[label] = results
        else:
            hint = f"not evaluated: `rlarith eval {run} --all-checkpoints --split {split}`"
            rows.append(f"| {label} | 0 | {hint} | - | - | - | - | {last_reward} |")
        if rewards:
            ax_rew.plot([s for s, _ in rewards], [r for _, r in rewards], label=label, linewidth=1)
    if not anything:
        raise ConfigError(
            "none of the runs has eval results or metrics.jsonl yet: train them (`rlarith train`) and score "
            "them (`rlarith eval RUN --all-checkpoints`) first."
        )
    draw_over_steps(ax_acc, accuracy, ylabel=f"held-out ({split}) exact accuracy")
    fig.suptitle(f"{' vs '.join(labels)}: held-out accuracy ({split}) and training reward over steps")
    ax_rew.set(xlabel="training step", ylabel="training reward, mean per logged step (metrics.jsonl)")
    ax_rew.grid(alpha=0.3)
    if ax_rew.get_legend_handles_labels()[0]:
        ax_rew.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
    _save_figure(fig, Path(out))
    table = "\n".join(rows) + "\n"
    write_atomic(Path(out).with_suffix(".md"), table)
    return table
