"""The README's main command for real, for three seeds: bootstrap to the target accuracy, GRPO, and a verdict
(exact McNemar on greedy correctness of the same held-out problems, p < 0.01) that must say PASS.

Smaller than ``make demo`` so CI stays short (fewer GRPO steps, fewer problems scored); ``make demo``
keeps its full size. Its duration on 2 cores is in docs/checkpoint-policy.md.
"""

import re
import subprocess
import sys

import pytest

from conftest import REPO, rlarith_env

SMALL = ["training.max_steps=60", "eval.n=200"]


def demo(tmp_path, seed):
    overrides = [f"runs_dir={tmp_path}", f"model.path={tmp_path}/bootstrap/model", f"training.seed={seed}"]
    return subprocess.run(
        [sys.executable, "-m", "rlarith.cli", "demo", *overrides, *SMALL],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=rlarith_env(OMP_NUM_THREADS="2"),
        timeout=1500,
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_cpu_positive_control_passes(tmp_path, seed):
    proc = demo(tmp_path, seed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| held-out (200 val problems) | before | after |" in out
    table = {
        cells[1].strip(): cells[2:4]
        for cells in (line.split("|") for line in out.splitlines())
        if len(cells) == 5
    }
    before, after = (float(x) for x in table["greedy accuracy"])
    assert after > before and "sampled accuracy (T=1, 4 samples)" in table
    verdict = re.search(r"positive control: PASS \(greedy accuracy rose \+(\S+) .* p = (\S+) < 0\.01\)", out)
    assert verdict and float(verdict.group(1)) > 0 and float(verdict.group(2)) < 0.01, out[-1500:]
    assert re.search(r"bootstrap step \d+/2000: .*held-out greedy accuracy", out), (
        "the bootstrap shows progress"
    )
    assert not (tmp_path / "bootstrap" / "model.bootstrap").exists(), "the bootstrap leaves no work folders"
    assert "{'loss'" not in out and out.count("is deprecated") <= 2  # no raw log dicts, each warning once
    if seed:
        return
    again = demo(tmp_path, seed)  # everything is there: says what it reuses, trains nothing
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"[1/4] bootstrap: reusing {tmp_path}/bootstrap/model" in again.stdout
    assert "[3/4] GRPO: nothing to train" in again.stdout and "bootstrap step" not in again.stdout
    assert verdict.group(0) in again.stdout  # the same models measured again: the same verdict
