"""Shared fixtures: a tiny model warmed up just enough to give GRPO reward signal, and process helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# The one-node SLURM test cluster (tests/slurm_cluster.py); real filesystem faults (tests/fsfaults.py).
pytest_plugins = ["slurm_cluster", "fsfaults", "image_build"]

# Started as `cmd &` without job control (nohup, some CI runners), pytest and every child it starts inherit
# an ignored SIGINT, which rlarith rightly leaves ignored. The Ctrl-C tests play a terminal's foreground
# process: handled here, SIGINT is back to its default in every child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama after a short SFT on 2-digit addition: it answers with digits, sometimes right."""
    from rlarith.bootstrap import bootstrap
    from rlarith.config import load_config

    out = tmp_path_factory.mktemp("model") / "sft"
    cfg = load_config(REPO / "configs" / "default.yaml", [f"model.path={out}"])
    bootstrap(cfg, steps=60, out=out, evaluate=False)
    return out


def rlarith_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SCRATCH", None)
    env.update(extra)
    return env


def cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m rlarith.cli ARGS`` to completion, capturing its output."""
    return subprocess.run([sys.executable, "-m", "rlarith.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=rlarith_env(), timeout=timeout)  # fmt: skip


def start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``python -m rlarith.cli ARGS`` with output to ``log``."""
    fh = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "rlarith.cli", *args],
        cwd=REPO,
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=rlarith_env(**env),
    )


def run(args: list[str], log: Path, timeout: float = 600, **env: str) -> int:
    proc = start(args, log, **env)
    return proc.wait(timeout=timeout)


def wait_for(predicate, timeout: float = 300, interval: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def assert_traces_recompute(run_dir: Path, prompts: int = 4, generations: int = 4) -> Any:
    """A real run's traces, checked against the traced text (not against the values they were copied
    from): every reward recomputed from the completion with rlarith.rewards, the total with the run's
    weights, parsed with the shared parser, and the advantage with GRPO's group normalisation of those
    totals; each step holds ``prompts`` x ``generations`` completions, prompt-major across ranks.
    Returns the traces' frame."""
    import numpy as np
    import pandas as pd

    from rlarith import traces
    from rlarith.answers import extract_answer
    from rlarith.config import load_config
    from rlarith.rewards import REWARD_FUNCTIONS

    cfg = load_config(run_dir / "config.yaml")
    df = traces.open(run_dir).frame()
    mode = cfg.rewards.extraction
    for step, rows in df.groupby("step"):
        assert len(rows) == prompts * generations and rows["key"].nunique() == prompts
        texts, truths = rows["completion"].tolist(), [int(t) for t in rows["truth"]]
        total = np.zeros(len(rows))
        for name, weight in cfg.rewards.weights.items():
            want = REWARD_FUNCTIONS[name](texts, truths, mode=mode)
            assert rows[f"reward/{name}"].tolist() == want, (step, name)
            total += weight * np.asarray(want)
        assert rows["reward_total"].to_numpy() == pytest.approx(total, abs=1e-9)
        assert [None if pd.isna(p) else p for p in rows["parsed"]] == [extract_answer(t, mode) for t in texts]
        groups = total.reshape(prompts, generations)  # a prompt's completions together, rank after rank
        adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
        assert rows["advantage"].to_numpy() == pytest.approx(adv.reshape(-1), rel=1e-4, abs=1e-4), step
    assert df["reward_total"].std() > 0  # the rewards vary, so the comparisons above have teeth
    return df
