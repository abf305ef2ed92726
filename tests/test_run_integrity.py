"""The run directory as the source of truth, without training: checksummed checkpoints and what happens to
damaged ones, the run-directory lock between real processes, metrics.jsonl across attempts, and the stop
signals (SIGINT's two-step convention, signals blocked by a launcher) in real processes."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conftest import REPO, cli, rlarith_env
from rlarith import manifest
from rlarith import metrics as metrics_file
from rlarith.checkpoints import (
    COMPLETE,
    checkpoint_path,
    checkpoints_dir,
    clean_staging,
    latest_verified,
    moved_aside,
    prune,
    seal,
    staging_dir,
    valid_checkpoints,
    verify,
)
from rlarith.config import ConfigError
from rlarith.runlock import RunLock, RunLocked

FILES = {
    "model.safetensors": 3 * 2**20,
    "optimizer.pt": 2**20,
    "scheduler.pt": 1000,
    "rng_state.pth": 2000,
    "trainer_state.json": 300,
}


def stage(run_dir: Path, step: int, files: dict[str, int] = FILES) -> Path:
    staged = staging_dir(run_dir) / f"checkpoint-{step}"
    staged.mkdir(parents=True, exist_ok=True)
    for name, size in files.items():
        pattern = f"{step}:{name}:".encode()
        (staged / name).write_bytes((pattern * (size // len(pattern) + 1))[:size])
    return staged


def save(run_dir: Path, step: int) -> Path:
    final = checkpoint_path(run_dir, step)
    seal(stage(run_dir, step), final, {"step": step}, required=list(FILES))
    return final


def truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def zero_inside(path: Path) -> None:
    with path.open("r+b") as f:  # same size, 1 MiB of zeros in the middle: only a checksum sees it
        f.seek(2**20)
        f.write(bytes(2**20))


DAMAGE = {
    "truncated model": ("model.safetensors", truncate, "truncated"),
    "truncated optimizer": ("optimizer.pt", truncate, "truncated"),
    "zeroed bytes in the model": ("model.safetensors", zero_inside, "checksum mismatch"),
    "deleted RNG state": ("rng_state.pth", lambda p: p.unlink(), "missing"),
}


# ------------------------------------------------------------------------------------------ checksums


def test_seal_records_a_checksum_per_file_and_a_good_checkpoint_verifies(tmp_path):
    final = save(tmp_path, 4)
    sums = json.loads((final / manifest.CHECKSUMS).read_text())
    assert sums["algorithm"] == "xxh3_128" and set(sums["files"]) == {*FILES, "rlarith_state.json"}
    marker = json.loads((final / COMPLETE).read_text())
    assert marker["files"] == {name: entry["size"] for name, entry in sums["files"].items()}
    result = verify(final)
    assert result.ok and result.checksums and result.files == len(FILES) + 1
    assert result.bytes == sum(FILES.values()) + (final / "rlarith_state.json").stat().st_size


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_kind_of_damage_is_found(tmp_path, kind):
    name, damage, reason = DAMAGE[kind]
    final = save(tmp_path, 4)
    damage(final / name)
    problems = verify(final).problems
    assert len(problems) == 1 and problems[0].file == name and problems[0].reason.startswith(reason)
    # Sizes alone (what prune checks) see everything but same-size corruption.
    assert verify(final, digests=False).ok == (reason == "checksum mismatch")


def test_a_damaged_record_is_itself_a_problem(tmp_path):
    final = save(tmp_path, 4)
    (final / manifest.CHECKSUMS).write_text("{not json")
    assert [p.file for p in verify(final).problems] == [manifest.CHECKSUMS]
    final = save(tmp_path, 6)
    (final / COMPLETE).write_text("")
    assert [p.file for p in verify(final).problems] == [COMPLETE]


def test_a_checkpoint_sealed_before_checksums_is_checked_by_size(tmp_path):
    final = save(tmp_path, 4)
    (final / manifest.CHECKSUMS).unlink()
    zero_inside(final / "model.safetensors")
    result = verify(final)
    assert result.ok and not result.checksums  # nothing to compare the bytes with
    truncate(final / "optimizer.pt")
    assert [p.file for p in verify(final).problems] == ["optimizer.pt"]


def test_seal_refuses_a_folder_without_what_a_checkpoint_must_hold(tmp_path):
    save(tmp_path, 2)
    staged = stage(tmp_path, 4)
    (staged / "rng_state.pth").unlink()
    required = ["trainer_state.json", "rng_state.pth", ["model.safetensors", "model.safetensors.index.json"]]
    with pytest.raises(FileNotFoundError, match=r"lacks rng_state\.pth"):
        seal(staged, checkpoint_path(tmp_path, 4), {"step": 4}, required=required)
    assert [s for s, _ in valid_checkpoints(tmp_path)] == [2]
    (staged / "model.safetensors").rename(staged / "model.safetensors.index.json")  # an alternative
    (staged / "rng_state.pth").write_bytes(b"x")
    seal(staged, checkpoint_path(tmp_path, 4), {"step": 4}, required=required)
    assert [s for s, _ in valid_checkpoints(tmp_path)] == [2, 4]


# ------------------------------------------------------------------------------ fallback and retention


def test_damaged_checkpoints_are_moved_aside_and_the_previous_valid_one_is_used(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    truncate(checkpoint_path(tmp_path, 6) / "optimizer.pt")
    zero_inside(checkpoint_path(tmp_path, 4) / "model.safetensors")
    found = latest_verified(tmp_path)
    assert found.checkpoint == checkpoint_path(tmp_path, 2) and found.verified.ok
    assert [(m.step, m.path.name) for m in found.moved] == [
        (6, ".bad-6-optimizer.pt-truncated"),
        (4, ".bad-4-model.safetensors-checksum"),
    ]
    line = str(found.moved[0])
    assert "\n" not in line and "checkpoint-6" in line and "optimizer.pt: truncated" in line
    # Evidence is kept whole, out of every reader's way, and left alone by cleanup and retention.
    assert (checkpoints_dir(tmp_path) / ".bad-6-optimizer.pt-truncated" / COMPLETE).is_file()
    assert clean_staging(tmp_path) == [] and prune(tmp_path, None).removed == []
    assert [p.name for p in moved_aside(tmp_path)] == [
        ".bad-4-model.safetensors-checksum",
        ".bad-6-optimizer.pt-truncated",
    ]
    # The same step damaged again later gets its own name.
    save(tmp_path, 6)
    truncate(checkpoint_path(tmp_path, 6) / "optimizer.pt")
    assert latest_verified(tmp_path).moved[0].path.name == ".bad-6-optimizer.pt-truncated-2"


def test_nothing_verifies_means_start_from_the_model(tmp_path):
    save(tmp_path, 2)
    (checkpoint_path(tmp_path, 2) / "rng_state.pth").unlink()
    found = latest_verified(tmp_path)
    assert found.checkpoint is None and [m.step for m in found.moved] == [2]
    assert latest_verified(tmp_path / "empty").checkpoint is None


def test_retention_never_deletes_the_last_good_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        save(tmp_path, step)
    truncate(checkpoint_path(tmp_path, 8) / "model.safetensors")  # damaged after it was sealed
    truncate(checkpoint_path(tmp_path, 6) / "model.safetensors")
    report = prune(tmp_path, None)
    # 6 and 8 do not count: the good ones (2, 4) are the "latest" pair; the damaged are left as they are.
    assert report.removed == [] and {s for s, _ in valid_checkpoints(tmp_path)} == {2, 4, 6, 8}
    save(tmp_path, 10)
    assert [p.name for p, _ in prune(tmp_path, None, verified=10).removed] == []  # 2, 4, 10 kept
    save(tmp_path, 12)
    removed = [p.name for p, _ in prune(tmp_path, None, verified=12).removed]
    assert removed == ["checkpoint-4"] and {s for s, _ in valid_checkpoints(tmp_path)} == {2, 6, 8, 10, 12}


def test_checkpoints_verify_command(tmp_path):
    for step in (2, 4):
        save(tmp_path, step)
    ok = cli(["checkpoints", "verify", str(tmp_path)])
    assert ok.returncode == 0 and "checkpoint-2: ok" in ok.stdout and "2 ok, 0 damaged" in ok.stdout
    zero_inside(checkpoint_path(tmp_path, 4) / "model.safetensors")
    bad = cli(["checkpoints", "verify", str(tmp_path)])
    assert bad.returncode == 1
    assert "checkpoint-4: DAMAGED: model.safetensors: checksum mismatch" in bad.stdout
    assert valid_checkpoints(tmp_path)[-1][0] == 4  # verify only reports; it moves nothing
    missing = cli(["checkpoints", "verify", str(tmp_path / "nope")])
    assert missing.returncode == 2 and "no checkpoints/ folder" in missing.stderr


# ------------------------------------------------------------------------------------ run-directory lock

HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from rlarith.runlock import RunLock
    lock = RunLock(sys.argv[1]).acquire(int(sys.argv[2]))
    print("locked", flush=True)
    time.sleep(600)
    """
)


def hold(run_dir: Path, rank: int = 0, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(rank)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env=rlarith_env(**env))  # fmt: skip
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    first = hold(tmp_path, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(RunLocked) as refused:
            RunLock(tmp_path).acquire(0)
        message = str(refused.value)
        assert f"pid {first.pid} on {os.uname().nodename}" in message and "SLURM job 4242" in message
        assert "since 20" in message and isinstance(refused.value, ConfigError)
    finally:
        first.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock with the process
        first.wait()
    lock = RunLock(tmp_path).acquire(0)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_other_ranks_refuse_another_jobs_lock_but_not_their_own_rank_0s(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "rlarith.runlock.GROUP_WAIT_S", 0.5
    )  # how long a rank > 0 waits for its rank 0's note
    group = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    holder = hold(tmp_path, **group)
    try:
        for key, value in group.items():
            os.environ[key] = value
        RunLock(tmp_path).acquire(rank=1)  # our own rank 0 holds it: go on
        os.environ["MASTER_PORT"] = "29512"  # another job's ranks
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire(rank=1)
    finally:
        for key in group:
            os.environ.pop(key, None)
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire(rank=1)  # nobody holds it: a rank > 0 takes nothing and goes on
    RunLock(tmp_path).acquire(0).release()


def test_the_lock_can_be_switched_off_for_filesystems_without_flock(tmp_path, monkeypatch):
    holder = hold(tmp_path)
    try:
        monkeypatch.setenv("RLARITH_RUN_LOCK", "off")
        RunLock(tmp_path).acquire(0).release()  # warned, not locked
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------ metrics


def write_lines(path: Path, records: list[dict]) -> None:
    with path.open("a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records))


def test_a_resumed_attempt_keeps_one_record_per_step_and_moves_the_rest_aside(tmp_path):
    path = tmp_path / metrics_file.METRICS
    assert metrics_file.start_attempt(tmp_path, "a1", 1, 0) == 0
    write_lines(path, [{"time": f"t{s}", "step": s, "loss": float(s)} for s in range(1, 6)])
    with path.open("a") as fh:
        fh.write('{"time": "t6", "step": 6, "lo')  # killed mid-write
    assert metrics_file.start_attempt(tmp_path, "a2", 2, 3) == 3  # steps 4, 5 and the torn line
    write_lines(path, [{"time": f"u{s}", "step": s, "loss": 10.0 + s} for s in range(4, 7)])
    write_lines(path, [{"time": "u7", "step": 6, "train_runtime": 1.0}])

    raw = [json.loads(line) for line in path.read_text().splitlines()]
    losses = [r["step"] for r in raw if "loss" in r]
    assert losses == [1, 2, 3, 4, 5, 6]  # the file itself: each step once
    view = metrics_file.read(tmp_path)
    assert [(r["step"], r["attempt"]) for r in view if "loss" in r] == [
        (1, "a1"), (2, "a1"), (3, "a1"), (4, "a2"), (5, "a2"), (6, "a2"),
    ]  # fmt: skip
    assert [r["loss"] for r in view if r["step"] == 4] == [14.0]
    everything = metrics_file.read(tmp_path, all_attempts=True)
    old = [r for r in everything if r.get("superseded_by") == "a2"]
    assert [(r["step"], r["attempt"]) for r in old] == [(4, "a1"), (5, "a1")]
    side = (tmp_path / metrics_file.SUPERSEDED).read_text()
    assert '"torn"' in side and "lo" in side  # even the torn line is kept


def test_the_default_view_dedupes_a_file_written_before_markers(tmp_path):
    write_lines(tmp_path / metrics_file.METRICS,
                [{"step": s, "loss": 1.0} for s in (1, 2, 3)] + [{"step": s, "loss": 2.0} for s in (2, 3, 4)])  # fmt: skip
    view = metrics_file.read(tmp_path)
    assert [(r["step"], r["loss"], r["attempt"]) for r in view] == [
        (1, 1.0, None), (2, 2.0, None), (3, 2.0, None), (4, 2.0, None),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------- signals

SLEEPER = textwrap.dedent(
    """
    import sys, time
    from rlarith.preemption import StopRequest
    time.sleep(float(sys.argv[1]))  # signals sent now wait: the launcher started us with them blocked
    stop = StopRequest().install()
    print("installed", flush=True)
    try:
        for _ in range(600):
            if stop.requested:
                print("stop", stop.received.name, flush=True)
                sys.exit(75)
            time.sleep(0.01)
    except KeyboardInterrupt:
        print("aborted", flush=True)
        sys.exit(130)
    """
)


def sleeper(delay: float, blocked: bool) -> subprocess.Popen:
    from rlarith.preemption import block_stop_signals

    return subprocess.Popen([sys.executable, "-c", SLEEPER, str(delay)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=rlarith_env(),
                            preexec_fn=block_stop_signals if blocked else None)  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT])
def test_a_signal_sent_before_the_handler_exists_waits_for_it(sig):
    proc = sleeper(1.0, blocked=True)
    proc.send_signal(sig)  # long before install(): blocked, so pending, not fatal
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and out.endswith(f"stop {sig.name}\n"), (out, err)


def test_ctrl_c_once_stops_with_a_save_twice_aborts():
    proc = sleeper(0.0, blocked=False)
    assert proc.stdout.readline() == "installed\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "stop SIGINT" in out
    assert "stopping at the next step boundary with a save; press Ctrl-C again to abort without saving" in err

    code = "from rlarith.preemption import StopRequest; import os, signal, time\n" + textwrap.dedent(
        """
        stop = StopRequest().install()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.requested
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            print("aborted")
        """
    )
    twice = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert twice.stdout == "aborted\n", twice.stderr


def test_a_process_that_ignores_sigint_keeps_ignoring_it():
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from rlarith.preemption import StopRequest; s = StopRequest().install()\n"
        "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) == s._handle)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "True True\n", out.stderr


def test_rlarith_train_installs_the_stop_handler_before_any_heavy_import(tmp_path):
    # An import hook notes the SIGTERM handler at the moment torch, transformers or rlarith.training.run load.
    code = textwrap.dedent(
        f"""
        import signal, sys
        seen = {{}}
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name in ("torch", "transformers", "rlarith.training.run", "rlarith.data") and name not in seen:
                    seen[name] = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
                return None
        sys.meta_path.insert(0, Spy())
        from rlarith.cli import main
        code = main(["train", "model.path={tmp_path}/none", "runs_dir={tmp_path}"])
        print(code, sorted(seen.items()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=rlarith_env())  # fmt: skip
    code_, _, seen = out.stdout.partition(" ")
    assert code_ == "2" and "('rlarith.training.run', True)" in seen and "False" not in seen, (
        out.stdout + out.stderr
    )


def test_a_copied_run_directory_still_verifies(tmp_path):
    save(tmp_path / "a", 2)  # checksums are of contents, not of paths or times
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert verify(checkpoint_path(tmp_path / "b", 2)).ok


def test_a_rank_waits_for_its_rank_0_to_write_who_it_is(tmp_path, monkeypatch):
    """Rank 0 holds the lock but its note still names the previous attempt: rank 1 waits, then goes on."""
    group = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29513"}
    for key, value in group.items():
        monkeypatch.setenv(key, value)
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "group": "127.0.0.1:1"}) + "\n")  # a stale note
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, as by our rank 0 between flock and writing its note
    late = threading.Timer(
        0.5, lambda: os.pwrite(fd, (json.dumps({"pid": 2, "group": "127.0.0.1:29513"}) + "\n").encode(), 0)
    )
    late.start()
    try:
        RunLock(tmp_path).acquire(rank=1)  # waits for the note instead of refusing
    finally:
        late.join()
        os.close(fd)


def test_a_damaged_config_yaml_is_checked_against_the_checkpoints_copy(tmp_path):
    """An empty config.yaml (a crash) is not the default config: the start is checked against the copy of
    the config sealed into the latest checkpoint, so the same config resumes and another is refused naming
    what differs per that checkpoint (it was refused as "model.path cannot change", per the defaults).
    Without a copy, the refusal says how to restore the file."""
    from rlarith.config import ConfigDamaged, flat, load_config, save_config
    from rlarith.training.identity import run_id
    from rlarith.training.preflight import check_run_dir

    cfg = load_config(overrides=[f"runs_dir={tmp_path}", "name=r", "model.path=/models/m", "task.op=+"])
    save_config(cfg, cfg.run_dir / "config.yaml")
    final = checkpoint_path(cfg.run_dir, 2)
    seal(stage(cfg.run_dir, 2), final, {"run_id": run_id(cfg), "config": flat(cfg)}, required=list(FILES))
    (cfg.run_dir / "config.yaml").write_bytes(b"")
    assert check_run_dir(cfg, force=False) is None
    changed = load_config(overrides=[f"runs_dir={tmp_path}", "name=r", "model.path=/models/m", 'task.op="*"'])
    with pytest.raises(ConfigError, match=r"task.op: '\+' -> '\*'; per checkpoint-2"):
        check_run_dir(changed, force=False)
    (final / "rlarith_state.json").write_text(json.dumps({"step": 2}))  # sealed by an older rlarith
    with pytest.raises(
        ConfigDamaged, match="is empty .*checkpoint-2 holds no copy of the config.*rlarith config -c"
    ):
        check_run_dir(cfg, force=False)


def test_a_resume_says_which_covered_steps_have_no_metrics(tmp_path, caplog):
    """A checkpoint covers steps whose metrics are gone (a crash before they were fsynced, an edit): the
    resume says which, in one line, and goes on."""
    from rlarith.config import load_config
    from rlarith.training.identity import Attempt
    from rlarith.training.run import _prepare_run_dir

    cfg = load_config(overrides=[f"runs_dir={tmp_path}", "name=r"])
    save(cfg.run_dir, 4)
    write_lines(cfg.run_dir / "metrics.jsonl", [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}])
    logger = logging.getLogger("rlarith")  # its own handler: rlarith's logging may not propagate to root
    logger.addHandler(caplog.handler)
    try:
        _prepare_run_dir(cfg, None, Attempt("a", 1))
    finally:
        logger.removeHandler(caplog.handler)
    assert "metrics.jsonl has no records of step(s) 3-4, which checkpoint-4 covers" in caplog.text
