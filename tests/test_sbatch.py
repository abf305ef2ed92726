"""The plain sbatch template (slurm/rlarith.sbatch) asks SLURM for what `rlarith submit --dry-run` asks for,
for configs/positive_control.yaml: the same resources, the same stop signal and lead time, requeueable."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO, cli
from rlarith.preemption import EXIT_STOPPED

TEMPLATE = REPO / "slurm" / "rlarith.sbatch"
# What a job asks for; log paths, --open-mode and submitit's --wckey differ by design.
COMPARED = ("job-name", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "mem", "time", "signal",
            "requeue", "partition", "account", "qos")  # fmt: skip


def directives(script: str) -> dict[str, str]:
    """``#SBATCH --key=value`` (or a bare ``--flag``) lines as ``{key: value}``, flags as ``"1"``."""
    found = {}
    for match in re.finditer(r"^#SBATCH\s+--([\w-]+)(?:[= ](\S+))?", script, re.M):
        found[match.group(1)] = match.group(2) or "1"
    return found


def test_template_and_submit_ask_for_the_same_job() -> None:
    dry = cli(["submit", "--dry-run", "-c", "configs/positive_control.yaml"])
    assert dry.returncode == 0, dry.stdout + dry.stderr
    submitted = directives(dry.stdout.split("# the batch script (sbatch)", 1)[1])
    template = directives(TEMPLATE.read_text())
    assert {k: submitted.get(k) for k in COMPARED} == {k: template.get(k) for k in COMPARED}
    assert template["signal"] == "USR2@120" and template["requeue"] == "1"


def test_template_requeues_on_the_trainers_stop_exit_and_is_valid_bash() -> None:
    text = TEMPLATE.read_text()
    assert f"EXIT_STOPPED={EXIT_STOPPED}" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "apptainer exec --nv" in text
    subprocess.run(["bash", "-n", str(TEMPLATE)], check=True, timeout=30)
