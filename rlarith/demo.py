"""The positive control anyone can run on a laptop: bootstrap, measure, GRPO, measure again.

``rlarith demo`` (``make demo``) with the embedded defaults (configs/default.yaml):
1. ``rlarith bootstrap``: the tiny local model, SFT-warmed on 2-digit addition to partial accuracy;
2. held-out validation accuracy and mean reward of that model (greedy, and sampled at the training
   temperature, which is what GRPO optimises);
3. ``rlarith train``: GRPO from it (resumes if the run already has checkpoints);
4. the same measurements on the final checkpoint, and a verdict: the control passes when held-out
   sampled accuracy and mean reward both rose.
"""

from __future__ import annotations

from pathlib import Path

from rlarith.config import RunConfig

SAMPLES = 4
"""Completions per problem for the sampled measurement."""


def measure(model: Path, cfg: RunConfig) -> dict[str, float]:
    from rlarith.data import heldout, make_task
    from rlarith.evaluate import evaluate_model

    val = heldout(make_task(cfg.task), cfg.data, "val", min(cfg.eval.n, cfg.data.val_size))
    max_new = cfg.training.max_completion_length
    greedy = evaluate_model(
        model, val, cfg, batch_size=cfg.eval.batch_size, max_new_tokens=max_new, progress=False
    )
    sampled = evaluate_model(
        model,
        val,
        cfg,
        samples=SAMPLES,
        temperature=cfg.training.temperature,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=max_new,
        seed=cfg.training.seed,
        progress=False,
    )
    return {
        "greedy accuracy": greedy.accuracy,
        "sampled accuracy": sampled.accuracy,
        "sampled mean reward": sampled.mean_reward,
    }


def demo(cfg: RunConfig) -> int:
    from rlarith.bootstrap import bootstrap
    from rlarith.checkpoints import latest_valid
    from rlarith.train import train

    model = Path(cfg.model.path)
    if not (model / "config.json").is_file():
        print(f"[1/4] bootstrap: SFT-warming the tiny model into {model}")
        bootstrap(cfg, evaluate=False)
    print("[2/4] measuring the starting model on held-out problems")
    before = measure(model, cfg)
    print(f"[3/4] GRPO: {cfg.training.max_steps} steps in {cfg.run_dir}")
    status = train(cfg)
    if status != 0:
        return status
    final = latest_valid(cfg.run_dir)
    assert final is not None, "training finished without a checkpoint"
    print(f"[4/4] measuring {final}")
    after = measure(final, cfg)

    print(f"\n| held-out ({cfg.data.val_size} val problems) | before | after |\n|---|---|---|")
    for key in before:
        print(f"| {key} | {before[key]:.3f} | {after[key]:.3f} |")
    rose = (
        after["sampled accuracy"] > before["sampled accuracy"]
        and after["sampled mean reward"] > before["sampled mean reward"]
    )
    print(
        "\npositive control: "
        + ("PASS (held-out accuracy and reward rose)" if rose else "FAIL (no rise: look at the traces)")
    )
    return 0 if rose else 1
