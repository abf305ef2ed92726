"""Config loading: every user mistake is one clear paragraph naming the key and the fix."""

import subprocess
import sys

import pytest

from rlarith.config import ConfigError, flat, load_config, save_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["training.learnin_rate=1"],
            "training.learnin_rate: unknown key.*Did you mean 'training.learning_rate'",
        ),
        (["traning.seed=1"], "traning.seed: unknown key.*Did you mean 'training.seed'"),
        (["training.learning_rate=fast"], "training.learning_rate: expected float, got 'fast'"),
        (["training.max_steps=0"], "training.max_steps: must be at least 1"),
        (["training.num_generations=1"], "training.num_generations: GRPO needs a group"),
        (["task.digits_a=10"], "task.digits_a: must be between 1 and 9"),
        (["task.op=x"], "task.op: must be one of"),
        (["task.op=%"], "task.op=%.*not a valid value"),
        (["data.strategy=random"], "data.strategy: use 'fixed' or 'fresh'"),
        (["rewards.weights.exakt=1.0"], "rewards.weights.exakt: no such reward.*Did you mean 'exact'"),
        (["rewards.weights.exact=0"], "rewards.weights: at least one weight"),
        (["training.deepspeed=nope.json"], "training.deepspeed: file 'nope.json' not found"),
        (
            ["checkpoints.save_every=5", "training.steps_per_generation=2"],
            "checkpoints.save_every: must be a multiple",
        ),
        (["prompt.user=Compute"], "prompt.user: must contain the placeholder"),
        (["training.seed"], "overrides look like key=value"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("task:\n  op: '*\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("checkpoints:\n  save_evry: 10\n")
    with pytest.raises(ConfigError, match=r"checkpoints.save_evry: unknown key in .*typo.yaml.*save_every"):
        load_config(tmp_path / "typo.yaml")


def test_file_then_overrides_and_round_trip(tmp_path):
    cfg = load_config("configs/default.yaml", ["training.learning_rate=1e-3", "data.strategy=fresh"])
    assert (cfg.task.op, cfg.training.learning_rate, cfg.data.strategy) == ("+", 1e-3, "fresh")
    save_config(cfg, tmp_path / "config.yaml")
    assert flat(load_config(tmp_path / "config.yaml")) == flat(cfg)


def test_cli_prints_one_paragraph_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "rlarith.cli", "config", "training.learnin_rate=1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Did you mean 'training.learning_rate'" in proc.stderr
