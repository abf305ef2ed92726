"""The contamination check: held-out problems the run can have trained on are refused before scoring.

Every problem the run can have trained on (its config's whole data stream, plus whatever its traces
recorded, which also covers a run whose config changed mid-way) is compared with the held-out keys. An
overlap refuses the evaluation (``Contaminated``, exit status 2) unless forced; a forced result records it.
The fix the refusal names, ``rlarith data check --exclude-traces RUN``, rebuilds the held-out sets
without what the traces show (``rlarith.data.heldout``'s ``exclude_keys``).

Traces that cannot be read in full (a truncated shard, a damaged chunk or journal record) may have held
a held-out problem, so they refuse the evaluation too (``TracesUnreadable``), naming the files; so do
traces that are missing: steps the run's metrics.jsonl has and its traces lack (purged or lost), and a
trace folder that is gone altogether.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlarith.config import ConfigError, RunConfig
from rlarith.data import TrainProblems, make_task
from rlarith.tasks import Problem


class Contaminated(ConfigError):
    """Held-out problems overlap what the run can have trained on; scoring them would flatter the model."""


class TracesUnreadable(ConfigError):
    """Some of the run's trace files cannot be read: the problems they held are unknown."""


def stream_keys(cfg: RunConfig) -> set[str]:
    """Keys of every problem the config's data stream can produce over the whole run."""
    stream = TrainProblems(make_task(cfg.task), cfg.data, cfg.training.seed)
    return stream.seen_keys(cfg.training.max_steps * cfg.training.prompts_per_step)


def traced_keys(run_dir: Path, cfg: RunConfig) -> tuple[set[str], list[tuple[Path, str]]]:
    """Every problem key the run's traces recorded (all attempts and ranks), and what could not be read:
    trace files not readable in full, and steps metrics.jsonl has that no trace holds, each with the
    reason. Both the config's trace directory and ``<run>/traces`` (a moved run keeps its traces beside
    it) are read."""
    # Imported here: h5py and pandas are only needed when there are traces to read. No fallback on an
    # ImportError: a check that silently skipped the traces would pass contaminated sets.
    import warnings

    from rlarith.traces import Traces, missing_steps, missing_text, run_trace_dir

    keys: set[str] = set()
    skipped: list[tuple[Path, str]] = []
    traced: set[int] = set()
    every = cfg.training.steps_per_generation * cfg.training.num_iterations
    configured = run_trace_dir(run_dir, cfg)
    for trace_dir in dict.fromkeys([Path(run_dir) / "traces", configured]):
        if not trace_dir.is_dir() or not any(trace_dir.iterdir()):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped files are returned, and the caller decides
            tr = Traces(trace_dir, run_dir, every)
            tr.verify()
            keys |= tr.seen_keys()
        skipped += tr.skipped
        traced |= set(tr.steps(all_attempts=True)["step"].tolist())
    if cfg.traces.enabled:
        lacking = missing_steps(Path(run_dir), traced, every)
        if lacking:
            skipped.append((configured, missing_text(lacking, configured, Path(run_dir))))
    return keys, skipped


def trained_keys(run_dir: Path, cfg: RunConfig, force: bool = False) -> set[str]:
    """Keys of every problem the run can have trained on: its whole configured data stream, plus every
    problem its traces recorded. Unreadable trace files raise ``TracesUnreadable`` unless ``force``."""
    keys, skipped = traced_keys(run_dir, cfg)
    if skipped and not force:
        raise unreadable_error(skipped, run_dir)
    return stream_keys(cfg) | keys


def check_contamination(problems: Sequence[Problem], trained: set[str]) -> list[Problem]:
    """The held-out problems whose key is among ``trained``."""
    return [p for p in problems if p.key in trained]


def contamination_error(overlap: Sequence[Problem], total: int, source: str, run_dir: Path) -> Contaminated:
    examples = ", ".join(repr(p.question) for p in overlap[:5])
    run = Path(run_dir)
    return Contaminated(
        f"{len(overlap)} of {total} held-out problems in {source} could have been trained on by "
        f"{str(run)!r} (e.g. {examples}); scores on them would flatter the model. Rebuild the held-out "
        "sets without anything the run's config or traces can have trained on: "
        f"`rlarith data check -c {run / 'config.yaml'} --exclude-traces {run} --out {run / 'data'}`, then "
        "evaluate again; or pass --force to score anyway (the result records the overlap)."
    )


def unreadable_error(skipped: Sequence[tuple[Path, str]], run_dir: Path) -> TracesUnreadable:
    files = "; ".join(f"{path} ({reason})" for path, reason in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return TracesUnreadable(
        f"the traces of {str(Path(run_dir))!r} are not complete ({len(skipped)} problem(s)): {files}{more}. "
        "The steps in them may have trained on held-out problems, so the contamination check cannot "
        "vouch for the held-out set. Restore the files from a copy if there is one (`rlarith traces "
        "summary RUN` lists them), or pass --force to score anyway (the result records them)."
    )
