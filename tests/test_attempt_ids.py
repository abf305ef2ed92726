"""Attempt ids: one per start of the trainer, everywhere they are made (rlarith.training.identity).

A container restarted in place (podman start, a restart policy) keeps its hostname and its pid, so an id
made of those two repeats, and the traces reader, which keys resume points by attempt, then hides steps.
The end-to-end cases: tests/test_image.py (a container restarted twice) and tests/test_submit.py (the job
driver's id is the trainer's)."""

from __future__ import annotations

import re

from rlarith.training.identity import ATTEMPT_ENV, Attempt, new_attempt_id


def test_two_starts_with_the_same_hostname_and_pid_get_different_ids(monkeypatch) -> None:
    monkeypatch.delenv(ATTEMPT_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first, second = Attempt.current(), Attempt.current()  # one process: the same hostname and pid
    assert first.id != second.id
    assert re.fullmatch(r"local-\S+-\d+-[0-9a-f]{6}", first.id), first.id


def test_two_trainers_in_one_slurm_job_start_get_different_ids(monkeypatch) -> None:
    """A batch script may run `srun rlarith train` twice in one start of a job (no requeue between)."""
    monkeypatch.delenv(ATTEMPT_ENV, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "6631")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    first, second = Attempt.current(), Attempt.current()
    assert first.id != second.id and first.id.startswith("6631.2-") and second.id.startswith("6631.2-")


def test_the_job_drivers_id_is_the_trainers(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "6631")
    monkeypatch.setenv(ATTEMPT_ENV, new_attempt_id("6631", 0))
    assert Attempt.current().id == "6631.0"
    monkeypatch.setenv(ATTEMPT_ENV, given := new_attempt_id("7020"))  # the local executor: a pid, made unique
    assert Attempt.current().id == given and re.fullmatch(r"7020-[0-9a-f]{6}", given)
