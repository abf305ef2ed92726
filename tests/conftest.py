"""Shared fixtures: a tiny model warmed up just enough to give GRPO reward signal, and process helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["slurm_cluster"]  # the one-node SLURM test cluster (tests/slurm_cluster.py)


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
