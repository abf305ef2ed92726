"""The benchmark scripts still start: each one's ``--help`` parses and its imports resolve (rlarith's module
layout moves under them). Speed itself is measured in benchmarks/, never asserted here."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = [
    "step_overhead.py",
    "checkpoint_save.py",
    "resume_latency.py",
    "traces_bench.py",
    "gpu_overhead.py",
    "writer_gil.py",
    "trace_fsync.py",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as `python benchmarks/<script>`
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
