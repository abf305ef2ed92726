"""Checkpoint policy: when saves happen and why, which survive pruning, and that a crash at any moment
never leaves a checkpoint that looks valid but is not (real files, a real SIGKILLed process)."""

import inspect
import json
import math
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
    SavePolicy,
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
from rlarith.config import CheckpointConfig


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


# -------------------------------------------------------------------------------------------- policy

# Rewards of a simulated run: (step -> exact); every other step gets a dull value.
REWARDS = {1: 0.10, 12: 0.20, 20: 0.15, 30: 0.35, 31: 0.32, 40: 0.10, 60: 0.25}


def reward_at(step: int) -> float:
    return REWARDS.get(step, 0.05 if step < 32 else 0.2)


# step -> (reasons, best_step after the save, valid checkpoints after save + prune), by hand.
EXPECTED_RUN = {
    1: (["new best exact=0.100 (previous best: none)"], 1, {1}),
    12: (["new best exact=0.200 (previous best 0.100 at step 1)"], 12, {1, 12}),
    20: (["step 20 is a multiple of save_every=20"], 12, {1, 12, 20}),
    30: (
        [
            "reward exact=0.350 exceeds reward_threshold=0.3",
            "new best exact=0.350 (previous best 0.200 at step 12)",
        ],
        30,
        {1, 20, 30},
    ),
    31: (["reward exact=0.320 exceeds reward_threshold=0.3"], 30, {1, 30, 31}),
    40: (["step 40 is a multiple of save_every=20"], 30, {1, 30, 31, 40}),
    60: (["step 60 is a multiple of save_every=20"], 30, {1, 30, 40, 60}),
}


def test_simulated_run_saves_for_the_right_reasons_and_keeps_the_right_checkpoints(tmp_path):
    policy = SavePolicy(save_every=20, reward_threshold=0.3)
    for step in range(1, 61):
        exact = reward_at(step)
        reasons = policy.observe(step, exact, total=2 * exact)
        if step not in EXPECTED_RUN:
            assert reasons == [], step
            continue
        want_reasons, want_best, want_disk = EXPECTED_RUN[step]
        assert reasons == want_reasons
        # The trainer's order: record, seal with the state, report, prune.
        staged = stage(tmp_path, step, tag=f"run{step}")
        policy.record_save(step, policy.current(exact, 2 * exact), reasons)
        seal(
            staged,
            checkpoint_path(tmp_path, step),
            {**policy.state_dict(), "tag": f"run{step}", "step": step},
        )
        assert policy.best_step == want_best
        before = on_disk(tmp_path)
        report = prune(tmp_path, policy.best_step, policy.keep_best)
        assert on_disk(tmp_path) == want_disk, step
        assert {p for p, _ in report.removed} == {checkpoint_path(tmp_path, s) for s in before - want_disk}
        for _, folder in valid_checkpoints(tmp_path):
            assert_intact(folder)
    assert [h["step"] for h in policy.history] == sorted(EXPECTED_RUN)
    assert load_policy_state(latest_valid(tmp_path))["best_step"] == 30


def test_a_best_that_was_not_saved_never_becomes_best_step():
    policy = SavePolicy(save_every=20, reward_threshold=0.3, save_on_best=False)
    saved = {}
    for step in range(1, 61):
        exact = reward_at(step)
        reasons = policy.observe(step, exact, exact)
        assert not any("new best" in r for r in reasons)
        if reasons:
            saved[step] = reasons
            policy.record_save(step, policy.current(exact, exact), reasons)
            if step == 20:  # 0.20 at step 12 was the best seen, but step 20 (0.15) is the best *saved*
                assert (policy.best_reward, policy.best_reward_step, policy.best_step) == (0.20, 12, 20)
    assert sorted(saved) == [20, 30, 31, 40, 60] and policy.best_step == 30


def test_metrics_total_and_smoothed():
    total = SavePolicy(save_every=100, reward_threshold=1.5, reward_metric="total", save_on_best=False)
    assert total.observe(1, exact=0.9, total=1.4) == []
    assert total.observe(2, exact=0.1, total=1.6) == ["reward total=1.600 exceeds reward_threshold=1.5"]
    assert total.current(0.1, 1.6) == 1.6

    smooth = SavePolicy(save_every=100, reward_threshold=0.15, reward_metric="smoothed")
    assert smooth.observe(1, exact=0.0, total=9.0) == ["new best smoothed=0.000 (previous best: none)"]
    assert smooth.observe(2, exact=1.0, total=9.0) == [
        "new best smoothed=0.100 (previous best 0.000 at step 1)"
    ]
    assert smooth.observe(3, exact=1.0, total=9.0) == [
        "reward smoothed=0.190 exceeds reward_threshold=0.15",
        "new best smoothed=0.190 (previous best 0.100 at step 2)",
    ]
    assert smooth.observe(4, exact=math.nan, total=9.0)[0].startswith(
        "reward smoothed=0.190"
    )  # NaN is skipped
    assert smooth.ema == pytest.approx(0.19)
    assert math.isnan(SavePolicy(1, 0.0, reward_metric="smoothed").current(0.5, 0.5))
    with pytest.raises(ValueError, match="reward_metric"):
        SavePolicy(20, 0.3, reward_metric="mean")
    cfg = CheckpointConfig(save_every=40, reward_metric="smoothed", keep_best=False)
    assert SavePolicy.from_config(cfg) == SavePolicy(40, 0.3, True, False, "smoothed")


def test_report_names_the_reward_and_the_old_and_new_best():
    policy = SavePolicy(save_every=20, reward_threshold=0.3)
    first = policy.observe(1, 0.1, 0.1)
    assert "old best none, new best 0.100 (step 1)" in policy.report(1, first)
    policy.observe(12, 0.2, 0.2)
    reasons = policy.observe(30, 0.35, 0.35)
    text = policy.report(30, reasons)
    assert text.splitlines()[0] == "checkpoint-30 saved:"
    assert "reward exact: old best 0.200 (step 12), new best 0.350 (step 30)" in text
    assert all(f"  - {r}" in text for r in reasons)
    reasons = policy.observe(31, 0.32, 0.32)
    assert "reward exact: 0.320, best stays 0.350 (step 30)" in policy.report(31, reasons)
    reasons = policy.observe(40, 0.1, 0.1)  # a scheduled save: no reward line
    assert policy.report(40, reasons) == "checkpoint-40 saved:\n  - step 40 is a multiple of save_every=20"
    assert "no policy reason" in policy.report(41, [])


def test_state_round_trips_through_a_checkpoint(tmp_path):
    policy = SavePolicy(save_every=20, reward_threshold=0.3)
    for step in range(1, 31):
        if policy.observe(step, reward_at(step), 0.0) and step < 30:
            policy.record_save(step, reward_at(step), ["x"])
    # Step 30 asked for a save; the state is taken before record_save: it must already count step 30.
    staged = stage(tmp_path, 30)
    seal(
        staged, checkpoint_path(tmp_path, 30), {**policy.state_dict(), "attempt": "7", "tag": "a", "step": 30}
    )
    policy.record_save(30, 0.35, ["y"])
    assert [h["step"] for h in policy.state_dict()["history"]] == [1, 12, 20, 30]  # recorded once, not twice

    resumed = SavePolicy(save_every=20, reward_threshold=0.3)
    resumed.load_state_dict(load_policy_state(latest_valid(tmp_path)))  # unknown keys ignored
    want = {k: v for k, v in policy.state_dict().items() if k != "history"}
    assert {k: v for k, v in resumed.state_dict().items() if k != "history"} == want
    assert [h["step"] for h in resumed.history] == [1, 12, 20, 30] and resumed.best_step == 30
    assert (resumed.best_reward, resumed.best_reward_step, resumed.ema) == (0.35, 30, policy.ema)
    # Resumed, it continues as the original would have.
    assert resumed.observe(31, 0.36, 0.0) == policy.observe(31, 0.36, 0.0)

    other = SavePolicy(save_every=20, reward_threshold=0.3, reward_metric="total")
    other.load_state_dict(resumed.state_dict())  # a different metric: its best does not carry over
    assert (other.best_reward, other.best_step) == (None, None)
    assert [h["step"] for h in other.history] == [1, 12, 20, 30, 31]  # 31: observed, asked to save, counted


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
