"""The README's main command, for real: bootstrap, GRPO, and held-out accuracy and reward must rise."""

import subprocess
import sys

import pytest

from conftest import REPO, rlarith_env


@pytest.mark.slow
def test_the_cpu_positive_control_passes(tmp_path):
    overrides = [f"runs_dir={tmp_path}", f"model.path={tmp_path}/bootstrap/model"]
    proc = subprocess.run(
        [sys.executable, "-m", "rlarith.cli", "demo", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=rlarith_env(OMP_NUM_THREADS="2"),
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = {
        cells[1].strip(): cells[2:4]
        for cells in (line.split("|") for line in proc.stdout.splitlines())
        if len(cells) == 5
    }
    before, after = (float(x) for x in table["sampled accuracy"])
    assert after > before and "positive control: PASS" in proc.stdout
