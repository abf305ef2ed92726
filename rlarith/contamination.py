"""The contamination check: held-out problems the run can have trained on are refused before scoring.

Every problem the run can have trained on (its config's whole data stream, plus whatever its traces
recorded, which also covers a run whose config changed mid-way) is compared with the held-out keys. An
overlap refuses the evaluation (``Contaminated``, exit status 2) unless forced; a forced result records it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlarith.config import ConfigError, RunConfig
from rlarith.data import TrainProblems, make_task
from rlarith.tasks import Problem


class Contaminated(ConfigError):
    """Held-out problems overlap what the run can have trained on; scoring them would flatter the model."""


def _trace_keys(trace_dir: Path) -> set[str]:
    if not trace_dir.is_dir() or not any(trace_dir.iterdir()):
        return set()
    # Imported here: h5py and pandas are only needed when there are traces to read. No fallback on an
    # ImportError: a check that silently skipped the traces would pass contaminated sets.
    from rlarith.traces import open as open_traces

    return set(open_traces(trace_dir).seen_keys())


def trained_keys(run_dir: Path, cfg: RunConfig) -> set[str]:
    """Keys of every problem the run can have trained on: its whole configured data stream, plus every
    problem its traces recorded (which also covers a run whose config changed mid-way)."""
    from rlarith.traces import run_trace_dir

    stream = TrainProblems(make_task(cfg.task), cfg.data, cfg.training.seed)
    keys = stream.seen_keys(cfg.training.max_steps * cfg.training.prompts_per_step)
    # The trace dir of the config may be elsewhere ($SCRATCH); a moved run keeps its traces/ beside it.
    for trace_dir in dict.fromkeys([Path(run_dir) / "traces", run_trace_dir(run_dir, cfg)]):
        keys |= _trace_keys(trace_dir)
    return keys


def check_contamination(problems: Sequence[Problem], trained: set[str]) -> list[Problem]:
    """The held-out problems whose key is among ``trained``."""
    return [p for p in problems if p.key in trained]


def contamination_error(overlap: Sequence[Problem], total: int, source: str, run_dir: Path) -> Contaminated:
    examples = ", ".join(repr(p.question) for p in overlap[:5])
    return Contaminated(
        f"{len(overlap)} of {total} held-out problems in {source} could have been trained on by "
        f"{str(run_dir)!r} (e.g. {examples}); scores on them would flatter the model. Rebuild the held-out "
        f"sets with `rlarith data check -c {Path(run_dir) / 'config.yaml'} --out {Path(run_dir) / 'data'}`, "
        "or pass --force to score anyway (the result records the overlap)."
    )
