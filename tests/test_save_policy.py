"""The save policy: scheduled saves always, reward-triggered saves on the smoothed reward within a budget,
skipped triggers explained, state that survives a resume; and a real GRPO run with a generation window of
two steps, where the reward must come from the reward functions (TRL's logged metrics are empty there)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import REPO, run
from rlarith.checkpoints import (
    checkpoint_path,
    latest_valid,
    load_policy_state,
    prune,
    seal,
    staging_dir,
    valid_checkpoints,
)
from rlarith.config import CheckpointConfig, ConfigError, load_config
from rlarith.save_policy import EMA_ALPHA, SavePolicy, ema_update


class Clock:
    """A wall clock the test moves: ``step_s`` seconds pass at every ``observe``."""

    def __init__(self, step_s: float = 1.0) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step_s


def drive(
    policy: SavePolicy, clock: Clock, rewards: dict[int, float], save_s: float = 0.1, final: bool = True
) -> dict[int, list[str]]:
    """Run the policy over ``rewards`` (step -> exact), saving whenever it asks; returns step -> reasons."""
    saves = {}
    for step in sorted(rewards):
        clock.tick()
        last = final and step == max(rewards)
        reasons = policy.observe(step, rewards[step], rewards[step], forced=["final"] if last else [])
        if reasons:
            policy.record_save(step, policy.current(), reasons, seconds=save_s)
            clock.now += save_s
            saves[step] = reasons
    return saves


def rising(steps: int, start: float = 0.2, end: float = 0.8) -> dict[int, float]:
    """A reward that rises steadily: the old rule saved at every step once it passed the threshold."""
    return {s: start + (end - start) * s / steps for s in range(1, steps + 1)}


def test_a_steady_rise_saves_at_the_crossing_and_every_min_save_gap_steps_not_every_step():
    clock = Clock()
    policy = SavePolicy(save_every=50, reward_threshold=0.3, min_save_gap=10, clock=clock)
    saves = drive(policy, clock, rising(200))
    crossing = [s for s, r in saves.items() if any("crossed reward_threshold=0.3" in x for x in r)]
    assert len(crossing) == 1, saves  # the crossing fires once
    assert policy.current() > 0.3 and policy.crossed_step == crossing[0]
    assert {50, 100, 150, 200} <= set(saves)  # scheduled and final saves always happen
    steps = sorted(saves)
    assert all(b - a >= 10 for a, b in zip(steps, steps[1:]) if b % 50 and b != 200)
    assert 15 <= len(saves) <= 21, steps  # ~one per min_save_gap while it rises; the old rule: ~175
    assert all(
        r.startswith(("new best smoothed exact", "smoothed exact", "step", "final"))
        for s in saves.values()
        for r in s
    )


def test_the_smoothed_reward_is_an_ema_of_the_metric_and_one_lucky_batch_is_not_a_crossing():
    clock = Clock()
    policy = SavePolicy(save_every=1000, reward_threshold=0.5, min_save_gap=0, clock=clock)
    rewards = {s: 0.2 for s in range(1, 30)} | {10: 1.0}  # one lucky step
    saves = drive(policy, clock, rewards)
    assert not any("crossed" in r for reasons in saves.values() for r in reasons)
    ema = None
    for s in sorted(rewards):
        ema = ema_update(ema, rewards[s])
    assert policy.ema == pytest.approx(ema) and EMA_ALPHA == 0.1
    assert any("new best" in r for r in saves[10])  # the lucky step still lifts the average to a new best

    total = SavePolicy(save_every=1000, reward_threshold=1.5, reward_metric="total", clock=Clock())
    assert total.observe(1, exact=0.1, total=1.6) == ["smoothed total 1.600 crossed reward_threshold=1.5"]
    assert math.isnan(SavePolicy(10, 0.3).current())
    assert (
        SavePolicy(10, 0.3).observe(1, math.nan, math.nan) == []
    )  # no scored completions: nothing to smooth


def test_a_skipped_trigger_is_one_line_with_the_reason_and_a_crossing_waits_for_the_gap():
    clock = Clock()
    policy = SavePolicy(save_every=20, reward_threshold=0.3, min_save_gap=5, clock=clock)
    assert drive(policy, clock, {1: 0.1})  # final step (forced)
    clock.tick()
    assert policy.observe(2, 1.0, 1.0) == []  # EMA 0.19: a new best, but 1 step after the save
    [line] = policy.skipped
    assert line == (
        "step 2: no save for new best smoothed exact 0.190 (previous best 0.100 at step 1): "
        "1 step since the save at step 1 (checkpoints.min_save_gap=5)"
    )
    for step in (3, 4, 5):  # the EMA crosses 0.3 at step 4 (0.344); the crossing waits, reported each time
        clock.tick()
        assert policy.observe(step, 1.0, 1.0) == []
        crossing = [x for x in policy.skipped if "crossed reward_threshold=0.3" in x]
        assert len(crossing) == (step >= 4) and policy.crossed_step is None
    clock.tick()
    reasons = policy.observe(6, 1.0, 1.0)
    assert reasons[0].startswith("smoothed exact 0.") and "crossed" in reasons[0] and "new best" in reasons[1]
    assert policy.skipped == [] and policy.crossed_step == 6
    clock.tick()
    assert policy.observe(20, 0.0, 0.0) == ["step 20 is a multiple of save_every=20"]  # within the gap: saves


def test_the_wall_time_budget_skips_reward_saves_but_never_scheduled_ones():
    clock = Clock(step_s=1.0)
    policy = SavePolicy(
        save_every=40, reward_threshold=0.3, min_save_gap=0, max_save_fraction=0.05, clock=clock
    )
    saves = drive(policy, clock, rising(120), save_s=2.0)  # a save costs two steps
    reward_saves = [s for s, r in saves.items() if not any(x.startswith(("step", "final")) for x in r)]
    assert {40, 80, 120} <= set(saves)
    assert policy.save_s / policy.elapsed_s <= 0.05 + 2.0 / policy.elapsed_s  # at most one save over budget
    assert len(reward_saves) <= 2
    clock.tick()
    policy.observe(121, 1.0, 1.0)
    assert any("of the wall time" in x and "checkpoints.max_save_fraction=0.05" in x for x in policy.skipped)


def test_state_round_trips_and_a_resumed_policy_decides_as_the_original(tmp_path: Path):
    clock = Clock()
    policy = SavePolicy(save_every=20, reward_threshold=0.3, min_save_gap=3, clock=clock)
    rewards = rising(60)
    drive(policy, clock, {s: rewards[s] for s in range(1, 40)}, final=False)
    clock.tick()
    reasons = policy.observe(40, rewards[40], rewards[40])
    assert reasons[0] == "step 40 is a multiple of save_every=20"
    # Taken before record_save (as the trainer's seal does), the state already counts this save.
    staged = staging_dir(tmp_path) / "checkpoint-40"
    staged.mkdir(parents=True)
    seal(staged, checkpoint_path(tmp_path, 40), {**policy.state_dict(), "attempt": "7"})
    policy.record_save(40, policy.current(), reasons, seconds=0.1)
    state = load_policy_state(latest_valid(tmp_path))
    assert [h["step"] for h in state["history"]] == [h["step"] for h in policy.history]
    assert state["crossed_step"] == policy.crossed_step and state["ema"] == policy.ema

    resumed = SavePolicy(save_every=20, reward_threshold=0.3, min_save_gap=3, clock=Clock())
    resumed.load_state_dict(state)
    resumed.last_save_s, resumed.save_s = policy.last_save_s, policy.save_s  # the seal's time, added after
    for step in range(41, 61):  # same rewards, same wall time -> the same decisions
        clock.tick()
        now = policy.elapsed()
        assert resumed.observe(step, rewards[step], 0.0, elapsed=now) == policy.observe(
            step, rewards[step], 0.0
        )
        assert resumed.skipped == policy.skipped
    other = SavePolicy(save_every=20, reward_threshold=0.3, reward_metric="total")
    other.load_state_dict(state)  # another metric: smoothed value, best and crossing restart
    assert (other.ema, other.best_reward, other.crossed_step, other.best_step) == (None, None, None, None)


def test_retention_keeps_the_best_saved_checkpoint(tmp_path: Path):
    clock = Clock()
    policy = SavePolicy(save_every=20, reward_threshold=0.3, min_save_gap=5, clock=clock)
    rewards = rising(40) | {s: 0.0 for s in range(41, 61)}  # rises, then collapses
    for step in sorted(rewards):
        clock.tick()
        reasons = policy.observe(step, rewards[step], 0.0)
        if reasons:
            staged = staging_dir(tmp_path) / f"checkpoint-{step}"
            staged.mkdir(parents=True)
            (staged / "model.safetensors").write_bytes(b"x" * 100)
            policy.record_save(step, policy.current(), reasons, seconds=0.01)
            seal(staged, checkpoint_path(tmp_path, step), policy.state_dict())
            prune(tmp_path, policy.best_step, policy.keep_best)
    kept = [s for s, _ in valid_checkpoints(tmp_path)]
    best = max(policy.history, key=lambda h: h["reward"])["step"]
    assert policy.best_step == best and best in kept and kept[-1] == 60 and best <= 41


def test_config_keys_are_checked():
    cfg = CheckpointConfig(save_every=40, keep_best=False, max_save_fraction=0.1, min_save_gap=3)
    assert SavePolicy.from_config(cfg) == SavePolicy(40, 0.3, True, False, "exact", 0.1, 3)
    for key, value in (("max_save_fraction", 0), ("max_save_fraction", 1.5), ("min_save_gap", -1)):
        with pytest.raises(ConfigError, match=f"checkpoints.{key}"):
            load_config(overrides=[f"checkpoints.{key}={value}"])
    with pytest.raises(ConfigError, match="checkpoints.reward_metric: use exact or total"):
        load_config(overrides=["checkpoints.reward_metric=smoothed"])
    with pytest.raises(ConfigError, match=r"training.max_steps: .* = 4 .* got 10: use 8 or 12\."):
        load_config(overrides=["training.steps_per_generation=2", "training.num_iterations=2", "training.max_steps=10",
                               "checkpoints.save_every=20"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"got 3: use 4\.$"):
        load_config(
            overrides=["training.steps_per_generation=4", "training.max_steps=3", "checkpoints.save_every=4"]
        )


# ----------------------------------------------------------------------------------------- for real


@pytest.mark.slow
def test_a_two_step_generation_window_feeds_the_policy_real_rewards(sft_model: Path, tmp_path: Path):
    """``steps_per_generation: 2``: TRL logs the window's rewards at its first step only, so the boundary
    must take them from the reward functions. The threshold and best saves must fire on them."""
    args = [
        "train", "--config", str(REPO / "configs" / "default.yaml"), "name=window", f"runs_dir={tmp_path}",
        f"model.path={sft_model}", "training.max_steps=12", "training.steps_per_generation=2",
        "training.prompts_per_step=4", "training.num_generations=4", "training.max_completion_length=5",
        "training.learning_rate=1e-3", "training.report_to=[]",
        "rewards.weights.exact=1", "rewards.weights.partial=1", "rewards.weights.format=0.5",
        "checkpoints.reward_metric=total", "checkpoints.reward_threshold=0.05", "checkpoints.save_every=100",
        "checkpoints.min_save_gap=0", "checkpoints.max_save_fraction=1",
    ]  # fmt: skip
    log = tmp_path / "log"
    assert run(args, log) == 0, log.read_text()[-3000:]
    run_dir = tmp_path / "window"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["reward"] for r in records if "reward" in r}
    # TRL logs each window's reward once, at its first step (odd); the boundary steps (even) have none.
    assert sorted(logged) == [1, 3, 5, 7, 9, 11] and any(v > 0 for v in logged.values())

    history = load_policy_state(checkpoint_path(run_dir, 12))["history"]
    ema, expected = None, {}
    for first in sorted(logged):
        ema = ema_update(ema, logged[first])
        expected[first + 1] = ema
    assert history and all(h["step"] % 2 == 0 for h in history)
    for entry in history:  # the smoothed reward of every save is the EMA of the windows' real rewards
        assert entry["reward"] == pytest.approx(expected[entry["step"]], abs=1e-6), entry
    reasons = [r for h in history for r in h["reasons"]]
    assert sum("crossed reward_threshold=0.05" in r for r in reasons) == 1
    assert "step 12 is the final step" in reasons
    if max(expected.values()) > expected[2]:
        assert any(r.startswith("new best smoothed total") for r in reasons)
    screen = log.read_text()
    assert screen.count("checkpoint-12 saved: ") == 1  # one screen line per save
    assert screen.count("is_gradient_checkpointing") <= 1  # a warning once, not at every step

    # Two steps more (max_steps may grow on resume): the tied lm_head.weight "missing" is not reported,
    # and the resumed policy goes on from the saved smoothed reward.
    assert run([*args, "training.max_steps=14"], log) == 0, log.read_text()[-3000:]
    resumed = log.read_text()[len(screen) :]
    assert "resuming from" in resumed and "missing keys" not in resumed
    state = load_policy_state(checkpoint_path(run_dir, 14))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r["reward"] for r in records if r.get("step") == 13 and "reward" in r][-1]
    assert state["ema"] == pytest.approx(ema_update(expected[12], last), abs=1e-6)
