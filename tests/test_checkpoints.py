"""Checkpoint policy: when saves happen and why, which survive pruning, and that a crash at any moment
never leaves a checkpoint that looks valid but is not (real files, a real SIGKILLed process)."""

import inspect
import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlarith.checkpoints import (
    COMPLETE,
    STATE_FILE,
    PruneReport,
    checkpoint_path,
    checkpoints_dir,
    clean_staging,
    latest_valid,
    load_policy_state,
    prune,
    retained,
    seal,
    staging_dir,
    valid_checkpoints,
)


def files_for(step: int, tag: str, n: int = 3, size: int = 4096) -> dict[str, bytes]:
    """The files of a fake checkpoint: content depends on step, tag and name, so a mix-up shows."""
    out = {}
    for i in range(n):
        name = "model.safetensors" if i == 0 else f"global_step{step}/shard_{i}.pt"
        pattern = f"{tag}:{step}:{name}:".encode()
        out[name] = (pattern * (size // len(pattern) + 1))[:size]
    out["trainer_state.json"] = json.dumps({"global_step": step, "tag": tag}).encode()
    return out


def stage(run_dir: Path, step: int, tag: str = "a", **kwargs: int) -> Path:
    staged = staging_dir(run_dir) / f"checkpoint-{step}"
    for name, data in files_for(step, tag, **kwargs).items():
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        (staged / name).write_bytes(data)
    return staged


def save(run_dir: Path, step: int, tag: str = "a", **kwargs: int) -> Path:
    final = checkpoint_path(run_dir, step)
    seal(stage(run_dir, step, tag, **kwargs), final, {"tag": tag, "step": step, **kwargs})
    return final


def assert_intact(folder: Path) -> str:
    """A valid folder holds exactly the files its tag says, byte for byte, as COMPLETE lists them."""
    state = load_policy_state(folder)
    expected = files_for(
        int(state["step"]), state["tag"], **{k: v for k, v in state.items() if k in ("n", "size")}
    )
    marker = json.loads((folder / COMPLETE).read_text())
    assert marker["step"] == state["step"]
    assert set(marker["files"]) == set(expected) | {STATE_FILE}
    for name, data in expected.items():
        assert (folder / name).read_bytes() == data, f"{folder / name} is not what was staged"
        assert marker["files"][name] == len(data)
    return state["tag"]


def on_disk(run_dir: Path) -> set[int]:
    return {step for step, _ in valid_checkpoints(run_dir)}


# ------------------------------------------------------------------------------------------ retention


@pytest.mark.parametrize(
    ("steps", "best", "keep_best", "kept"),
    [
        ([], None, True, set()),
        ([20], None, True, {20}),
        ([20], 20, True, {20}),
        ([20, 40], None, True, {20, 40}),
        ([20, 40, 60], None, True, {20, 40, 60}),
        ([20, 40, 60, 80], None, True, {20, 60, 80}),
        ([20, 40, 60, 80], 40, True, {20, 40, 60, 80}),
        ([20, 40, 60, 80], 40, False, {20, 60, 80}),
        ([20, 40, 60, 80], 50, True, {20, 60, 80}),  # best not on disk: nothing extra
        ([20, 40, 60, 80, 100], 60, True, {20, 60, 80, 100}),
        ([20, 40, 60, 80, 100], 20, True, {20, 80, 100}),  # best is the first: size 3
        ([80, 20, 60, 40, 40], None, True, {20, 60, 80}),  # order and duplicates do not matter
        ([1, 12, 20, 30], 30, True, {1, 20, 30}),
    ],
)
def test_retained_table(steps, best, keep_best, kept):
    assert retained(steps, best, keep_best) == kept


@st.composite
def steps_and_best(draw):
    steps = draw(st.lists(st.integers(0, 10_000), max_size=25))
    best = draw(st.one_of(st.none(), st.integers(0, 10_000), st.sampled_from(steps) if steps else st.none()))
    return steps, best, draw(st.booleans())


@given(steps_and_best())
def test_retained_properties(case):
    steps, best, keep_best = case
    kept = retained(steps, best, keep_best)
    assert kept <= set(steps)
    assert len(kept) <= (4 if keep_best and best is not None else 3)
    if steps:
        ordered = sorted(set(steps))
        assert {ordered[0], ordered[-1]} <= kept and ordered[-2:][0] in kept
        assert (best in kept) == (best in ordered[:1] + ordered[-2:] or (keep_best and best in ordered))
    else:
        assert kept == set()
    assert retained(sorted(kept), best, keep_best) == kept  # idempotent: pruning twice removes nothing more


# ------------------------------------------------------------------------------------- seal and friends


def test_paths_and_what_counts_as_valid(tmp_path):
    assert checkpoint_path(tmp_path, 40) == checkpoints_dir(tmp_path) / "checkpoint-40"
    assert valid_checkpoints(tmp_path) == [] and latest_valid(tmp_path) is None
    staged = stage(tmp_path, 40)
    assert valid_checkpoints(tmp_path) == []  # staged, not sealed
    (staged / COMPLETE).write_text("{}")
    assert valid_checkpoints(tmp_path) == []  # .staging is never read, even with a marker
    (staged / COMPLETE).unlink()
    staged.rename(checkpoint_path(tmp_path, 40))
    assert valid_checkpoints(tmp_path) == []  # in place but without COMPLETE
    for name in ("checkpoint-007", "checkpoint-x", "ckpt-5"):  # not canonical names: never listed
        (checkpoints_dir(tmp_path) / name).mkdir()
        (checkpoints_dir(tmp_path) / name / COMPLETE).write_text("{}")
    save(tmp_path, 100)
    save(tmp_path, 20)
    assert valid_checkpoints(tmp_path) == [
        (20, checkpoint_path(tmp_path, 20)),
        (100, checkpoint_path(tmp_path, 100)),
    ]
    assert latest_valid(tmp_path) == checkpoint_path(tmp_path, 100)


def test_seal_makes_a_staged_folder_valid(tmp_path):
    staged = stage(tmp_path, 40, "a", n=4)
    final = checkpoint_path(tmp_path, 40)
    seal(staged, final, {"tag": "a", "step": 40, "n": 4, "best_step": None})
    assert not staged.exists() and valid_checkpoints(tmp_path) == [(40, final)]
    assert assert_intact(final) == "a"
    assert load_policy_state(final) == {"tag": "a", "step": 40, "n": 4, "best_step": None}
    assert set(json.loads((final / COMPLETE).read_text())) == {"step", "time", "files"}
    with pytest.raises(FileNotFoundError):
        seal(staged, final, {})  # nothing staged any more: the valid one is left alone
    assert assert_intact(final) == "a"


def test_seal_over_an_existing_checkpoint_replaces_it(tmp_path):
    save(tmp_path, 20, "a")
    save(tmp_path, 40, "a")
    save(tmp_path, 40, "b")  # a re-run of step 40 after a crash
    assert on_disk(tmp_path) == {20, 40}
    assert assert_intact(checkpoint_path(tmp_path, 40)) == "b"
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == [
        ".staging",
        "checkpoint-20",
        "checkpoint-40",
    ]


def test_an_interrupted_replace_keeps_a_valid_checkpoint(tmp_path):
    # The moments inside seal() when `final` already existed, rebuilt by hand. After clean_staging (which
    # every start runs) checkpoint-40 is valid and whole: the old one or the new one, never neither.
    root = checkpoints_dir(tmp_path)
    final, trash = checkpoint_path(tmp_path, 40), root / ".trash-checkpoint-40"

    # 1. Crash between the two renames: the old one is parked, the new one sealed but still staged.
    save(tmp_path, 40, "old")
    seal(stage(tmp_path, 40, "new"), staging_dir(tmp_path) / "sealed", {"tag": "new", "step": 40})
    final.rename(trash)
    assert valid_checkpoints(tmp_path) == []
    assert clean_staging(tmp_path) == [staging_dir(tmp_path) / "sealed"]  # the old one is renamed back
    assert assert_intact(final) == "old" and on_disk(tmp_path) == {40} and not trash.exists()

    # 2. Crash while deleting the parked old one: its COMPLETE went first, so it is garbage.
    save(tmp_path, 40, "new")
    shutil.copytree(final, trash)
    (trash / COMPLETE).unlink()
    (trash / "model.safetensors").unlink()
    assert clean_staging(tmp_path) == [trash]
    assert assert_intact(final) == "new" and on_disk(tmp_path) == {40}

    # 3. A stale trash next to a valid checkpoint, then a re-save: seal clears it too.
    shutil.copytree(final, trash)
    save(tmp_path, 40, "newer")
    assert not trash.exists() and assert_intact(final) == "newer"

    # 4. A re-save over a half-deleted (invalid) folder of the same step.
    (final / COMPLETE).unlink()
    save(tmp_path, 40, "newest")
    assert assert_intact(final) == "newest" and sorted(p.name for p in root.iterdir()) == [
        ".staging",
        final.name,
    ]


def test_clean_staging_removes_leftovers_and_never_a_valid_checkpoint(tmp_path):
    save(tmp_path, 20)
    save(tmp_path, 40)
    stage(tmp_path, 60)  # the Trainer was writing this when the job died
    (staging_dir(tmp_path) / "tmp-checkpoint-61").write_text("partial")
    half_deleted = checkpoint_path(tmp_path, 10)  # prune was deleting this one
    half_deleted.mkdir()
    (half_deleted / "optimizer.pt").write_bytes(b"x" * 100)
    removed = clean_staging(tmp_path)
    assert sorted(removed) == sorted(
        [staging_dir(tmp_path) / "checkpoint-60", staging_dir(tmp_path) / "tmp-checkpoint-61", half_deleted]
    )
    assert not any(p.exists() for p in removed)
    assert on_disk(tmp_path) == {20, 40} and staging_dir(tmp_path).is_dir()
    assert clean_staging(tmp_path) == []
    assert clean_staging(tmp_path / "nothing-here") == []


def test_prune_keeps_the_only_checkpoint_and_reports_what_it_removes(tmp_path):
    save(tmp_path, 20)
    for best in (None, 20, 999):
        report = prune(tmp_path, best)
        assert report.removed == [] and on_disk(tmp_path) == {20}
    assert "pruned nothing" in str(report) and "kept checkpoint-20" in str(report)

    for step in (40, 60, 80):
        save(tmp_path, step, size=3 * 2**20)
    size = sum(len(b) for b in files_for(40, "a", size=3 * 2**20).values())
    report = prune(tmp_path, best_step=None)
    assert on_disk(tmp_path) == {20, 60, 80}
    path = checkpoint_path(tmp_path, 40)
    assert not path.exists() and report.kept == [checkpoint_path(tmp_path, s) for s in (20, 60, 80)]
    [(removed, freed)] = report.removed
    assert removed == path and size < freed < size + 2048  # + the state file and COMPLETE
    text = str(report)
    assert path.as_posix() in text and "freed 9.0 MiB" in text and "(9.0 MiB)" in text
    assert "kept checkpoint-20, checkpoint-60, checkpoint-80" in text
    assert isinstance(report, PruneReport) and report.bytes_freed == freed


# The save policy (when to save) has its own tests: tests/test_save_policy.py.


def test_module_does_not_import_torch():
    code = "import sys, rlarith.checkpoints; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------------------- crash, for real

CHILD = (
    "import json\n"
    + textwrap.dedent(inspect.getsource(files_for))
    + textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from rlarith.checkpoints import checkpoint_path, seal, staging_dir

        run_dir, step, tag, n, size = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        staged = staging_dir(run_dir) / f"checkpoint-{step}"
        print("ready", flush=True)
        for name, data in files_for(step, tag, n, size).items():
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            (staged / name).write_bytes(data)
        seal(staged, checkpoint_path(run_dir, step), {"tag": tag, "step": step, "n": n, "size": size})
        print("done", flush=True)
        """
    )
)


def run_child(run_dir: Path, step: int, tag: str, n: int, size: int, kill_after: float | None) -> float:
    """Run CHILD; SIGKILL it ``kill_after`` seconds after it is ready. Returns its seconds from ready."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(run_dir), str(step), tag, str(n), str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n"
    started = time.monotonic()
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if kill_after is None:
        assert proc.returncode == 0 and proc.stdout.read() == "done\n"
    proc.stdout.close()
    return time.monotonic() - started


def test_sigkill_at_random_moments_never_leaves_a_broken_valid_checkpoint(tmp_path):
    n, size = 9, 4 * 2**20  # ~32 MiB in 9 files, two folders deep
    save(tmp_path, 20, "base")
    duration = run_child(tmp_path, 40, "t0", n, size, kill_after=None)
    assert_intact(checkpoint_path(tmp_path, 40))
    assert clean_staging(tmp_path) == []
    rng = random.Random(0)
    kills = [duration * f for f in (0.0, 0.3, 0.6, 0.85, 0.95, 1.0)] + [
        rng.uniform(0, duration) for _ in range(4)
    ]
    for i, kill_after in enumerate(kills, start=1):
        step = 40 if i % 3 else 60  # mostly a re-save over an existing checkpoint, sometimes a new one
        before = {s: assert_intact(p) for s, p in valid_checkpoints(tmp_path)}
        run_child(tmp_path, step, f"t{i}", n, size, kill_after)
        # Straight after the crash: whatever is listed as valid is whole.
        for _, folder in valid_checkpoints(tmp_path):
            assert_intact(folder)
        # After the cleanup every start runs: nothing valid was lost, nothing invalid remains.
        clean_staging(tmp_path)
        after = {s: assert_intact(p) for s, p in valid_checkpoints(tmp_path)}
        assert after.get(20) == "base"
        for s, tag in before.items():
            assert s in after, f"kill {i} lost checkpoint-{s}"
            assert after[s] in ({tag, f"t{i}"} if s == step else {tag}), (i, s)
        assert set(after) - set(before) <= {step}
        assert list(staging_dir(tmp_path).iterdir()) == []
        assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == sorted(
            [".staging", *(f"checkpoint-{s}" for s in after)]
        )
