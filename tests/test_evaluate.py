"""Held-out evaluation: scoring by hand, real generation with tiny local models, contamination refusal, the
eval/compare CLI on real run directories (config.yaml from save_config, checkpoints from save_pretrained)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlarith import metrics
from rlarith.answers import extract_answer
from rlarith.cli import main
from rlarith.config import ConfigError, RunConfig, load_config, save_config
from rlarith.data import TrainProblems, heldout, make_task, read_problems, write_problems
from rlarith.evaluate import (
    ERROR_KINDS,
    EvalResult,
    EvalSettings,
    check_contamination,
    evaluate_model,
    resolve_target,
    run_eval,
    score_completions,
    trained_keys,
    wilson_interval,
)
from rlarith.tasks import Problem
from rlarith.tinymodel import build_model, build_tokenizer, init_model

ROOT = Path(__file__).resolve().parents[1]


def sharp_model(out: Path, seed: int = 1, scale: float = 10.0) -> Path:
    """A tiny Llama whose greedy replies depend on the prompt. At the default init the residual stream is
    the last input embedding and every reply is a row of newlines; scaled layers make the prompt matter,
    so a padding bug (or batch-dependent output) shows up as a different completion."""
    tok = build_tokenizer()
    model = build_model(len(tok), seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layers" in name and param.dim() == 2:
                param.mul_(scale)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_run(
    root: Path, name: str, base: Path, steps: tuple[int, ...] = (), incomplete: tuple[int, ...] = ()
) -> RunConfig:
    """A run directory as training leaves it: config.yaml and checkpoint folders (COMPLETE on the valid ones)."""
    cfg = load_config(
        overrides=[
            f"name={name}",
            f"runs_dir={root}",
            "task.op=+",
            "task.digits_a=2",
            "task.digits_b=2",
            "data.strategy=fixed",
            "data.train_size=200",
            "data.val_size=40",
            "data.val_fraction=0.1",
            "training.max_steps=5",
            f"model.path={base}",
            "eval.n=6",
            "eval.batch_size=6",
            "eval.max_new_tokens=6",
            "traces.enabled=false",
        ]
    )
    save_config(cfg, cfg.run_dir / "config.yaml")
    for i, step in enumerate(steps + incomplete):
        ckpt = init_model(cfg.run_dir / "checkpoints" / f"checkpoint-{step}", seed=10 + i)
        if step in steps:
            (ckpt / "COMPLETE").write_text("")
    return cfg


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return sharp_model(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, base_model) -> tuple[RunConfig, str]:
    """A run with checkpoints 2 and 4 (and an unfinished 6), scored with --all-checkpoints."""
    cfg = make_run(tmp_path_factory.mktemp("runs"), "alpha", base_model, steps=(2, 4), incomplete=(6,))
    code = main(["eval", str(cfg.run_dir), "--all-checkpoints", "--n", "5"])
    assert code == 0
    return cfg, (cfg.run_dir / "eval" / "val-over-steps.md").read_text()


# ---- scoring, no model -----------------------------------------------------------------------------------


def test_scoring_counts_on_hand_written_completions():
    completions = ["5535", " = 5,535. ", "The answer is 5535", "-5535", "553", "5935", "6534", ""]
    truths = [5535] * len(completions)
    weights = {"exact": 1.0, "partial": 0.5, "format": 0.25}
    s = score_completions(completions, truths, weights, extraction="strict", samples=2)
    assert s["errors"] == {
        "correct": 2,
        "extraction_failure": 2,
        "wrong_sign": 1,
        "wrong_digit_count": 1,
        "wrong_digits": 2,
        "digit_position_0": 1,  # 6534: units and thousands wrong
        "digit_position_1": 0,
        "digit_position_2": 1,  # 5935: hundreds wrong
        "digit_position_3": 1,
    }
    assert s["accuracy"] == 2 / 8 and s["accuracy_last"] == 3 / 8
    assert s["extraction_failure_rate"] == 2 / 8 and s["extraction_failure_rate_last"] == 1 / 8
    # partial: 1, 1, 0 (not strict), 0.8 (sign), 0.4 (553), 0.8 (5935), 0.6 (6534), 0
    assert s["partial_mean"] == pytest.approx(4.6 / 8)
    # exact 2/8 + 0.5 * partial 0.575 + 0.25 * format 6/8
    assert s["mean_reward"] == pytest.approx(0.25 + 0.2875 + 0.1875)
    # The reward follows rewards.extraction: with "last" the wordy reply counts for exact and partial.
    s_last = score_completions(completions, truths, weights, extraction="last", samples=2)
    assert s_last["mean_reward"] == pytest.approx(3 / 8 + 0.5 * 5.6 / 8 + 0.1875)
    assert s_last["accuracy"] == s["accuracy"]  # reported accuracy is always strict
    # Two samples per problem: the interval counts 4 problems, not 8 completions.
    assert s["ci95"] == wilson_interval(1, 4)
    assert s["parsed_strict"] == [extract_answer(c) for c in completions]


def test_wilson_interval_sanity():
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))  # closed form at k = 0
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + z2)), 1.0)
    for k, n in [(1, 7), (30, 100), (499, 1000)]:
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo < k / n < hi <= 1
        lo2, hi2 = wilson_interval(n - k, n)
        assert (lo2, hi2) == (pytest.approx(1 - hi), pytest.approx(1 - lo))  # symmetric
        lo4, hi4 = wilson_interval(4 * k, 4 * n)
        assert hi4 - lo4 < hi - lo  # more data, narrower
    assert [round(x, 4) for x in wilson_interval(50, 100)] == [0.4038, 0.5962]


def test_eval_result_round_trips_through_json():
    r = EvalResult(3, 1, 0.0, "val", 2, "m", 0.5, (0.1, 0.9), 0.6, 0.1, 0.0, 0.7, 0.5, {"correct": 1})
    again = EvalResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r and "records" not in r.to_dict(records=False)


# ---- generation with real tiny models --------------------------------------------------------------------


PROBLEMS = [
    Problem("7 + 8", 15, "+:7:8"),
    Problem("12 + 34", 46, "+:12:34"),
    Problem("123456 + 7", 123463, "+:7:123456"),
    Problem("1 + 1", 2, "+:1:1"),
    Problem("99 + 99", 198, "+:99:99"),
]


def test_greedy_eval_is_deterministic_and_batching_free(base_model):
    cfg = load_config()
    a = evaluate_model(base_model, PROBLEMS, cfg, batch_size=5, max_new_tokens=8, progress=False)
    b = evaluate_model(base_model, PROBLEMS, cfg, batch_size=5, max_new_tokens=8, progress=False)
    assert a == b
    texts = [r["completion"] for r in a.records]
    assert len(set(texts)) > 1  # the replies depend on the prompt, so the next check has teeth
    # Left padding: each prompt batched with longer and shorter ones gives what it gives alone.
    alone = evaluate_model(base_model, PROBLEMS, cfg, batch_size=1, max_new_tokens=8, progress=False)
    assert texts == [r["completion"] for r in alone.records]
    assert a.n == 5 and a.samples == 1 and len(a.records) == 5
    assert [r["parsed_strict"] for r in a.records] == [extract_answer(t) for t in texts]
    assert [r["parsed_last"] for r in a.records] == [extract_answer(t, "last") for t in texts]
    assert sum(a.errors[k] for k in ERROR_KINDS) == 5  # every completion has exactly one kind


def test_sampling_is_seeded_and_greedy_refuses_samples(base_model):
    cfg = load_config()
    kw = dict(samples=3, temperature=1.0, batch_size=2, max_new_tokens=6, progress=False)
    a = evaluate_model(base_model, PROBLEMS[:3], cfg, seed=0, **kw)
    assert a == evaluate_model(base_model, PROBLEMS[:3], cfg, seed=0, **kw)
    assert a.records != evaluate_model(base_model, PROBLEMS[:3], cfg, seed=1, **kw).records
    assert len(a.records) == 9 and [r["question"] for r in a.records[:3]] == ["7 + 8"] * 3
    with pytest.raises(ConfigError, match="greedy"):
        evaluate_model(base_model, PROBLEMS[:3], cfg, samples=2, temperature=0.0, progress=False)


# ---- contamination and the CLI ---------------------------------------------------------------------------


def test_trained_keys_cover_the_configured_stream(tmp_path, base_model):
    cfg = make_run(tmp_path, "keys", base_model)
    keys = trained_keys(cfg.run_dir, cfg)
    stream = TrainProblems(make_task(cfg.task), cfg.data, cfg.training.seed)
    assert len(keys) == 200  # fixed strategy: all train_size problems, whatever the step count
    assert {stream.problem(i).key for i in range(100)} <= keys
    val = heldout(make_task(cfg.task), cfg.data, "val", 10)
    assert check_contamination(val, keys) == []
    assert check_contamination(val + [stream.problem(3)], keys) == [stream.problem(3)]


def test_problems_in_the_traces_count_as_trained(tmp_path, base_model, capsys):
    """A problem the traces show was trained on (say the config changed mid-run) is refused too."""
    from rlarith.config import TraceConfig
    from rlarith.traces import TraceWriter

    cfg = make_run(tmp_path, "traced", base_model, steps=(1,))
    val = heldout(make_task(cfg.task), cfg.data, "val", 6)
    assert check_contamination(val, trained_keys(cfg.run_dir, cfg)) == []  # clean by the config alone
    writer = TraceWriter(
        cfg.run_dir / "traces", run_id="r", rank=0, attempt="a", attempt_seq=0, cfg=TraceConfig()
    )
    with writer:
        writer.write_step(1, {"key": [val[2].key], "prompt": ["p"], "completion": ["c"]})
    assert check_contamination(val, trained_keys(cfg.run_dir, cfg)) == [val[2]]
    assert main(["eval", str(cfg.run_dir), "--n", "6"]) == 2
    assert repr(val[2].question) in capsys.readouterr().err


def test_eval_refuses_contaminated_heldout_unless_forced(tmp_path, base_model, capsys):
    cfg = make_run(tmp_path, "dirty", base_model, steps=(2,))
    leak = TrainProblems(make_task(cfg.task), cfg.data, cfg.training.seed).problem(0)
    clean = heldout(make_task(cfg.task), cfg.data, "val", 5)
    write_problems(clean[:3] + [leak] + clean[3:], cfg.run_dir / "data" / "val.jsonl")

    assert main(["eval", str(cfg.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "1 of 6 held-out problems" in err and repr(leak.question) in err and "--force" in err
    assert not (cfg.run_dir / "eval").exists()  # refused before any scoring

    assert main(["eval", str(cfg.run_dir), "--force"]) == 0
    saved = json.loads((cfg.run_dir / "eval" / "val-step2.json").read_text())
    assert saved["contaminated"] == 1 and saved["n"] == 6 and saved["step"] == 2
    assert leak.question in [r["question"] for r in saved["records"]]
    assert (cfg.run_dir / "eval" / "val-step2.md").read_text().startswith("| step |")
    assert "contaminated: 1" in capsys.readouterr().out


def test_eval_target_mistakes_exit_2(tmp_path, base_model, capsys):
    cfg = make_run(tmp_path, "empty", base_model, incomplete=(3,))
    assert main(["eval", str(cfg.run_dir)]) == 2  # no valid checkpoint
    assert main(["eval", str(cfg.run_dir / "checkpoints" / "checkpoint-3")]) == 2  # no COMPLETE
    assert main(["eval", str(base_model)]) == 2  # bare model without --config
    assert main(["eval", str(cfg.run_dir), "--samples", "4"]) == 2  # greedy with samples
    err = capsys.readouterr().err
    assert "no valid checkpoint" in err and "COMPLETE" in err and "--config" in err and "greedy" in err
    # A bare model with the run's config scores against that run's held-out set.
    assert main(["eval", str(base_model), "--config", str(cfg.run_dir / "config.yaml"), "--n", "3"]) == 0
    assert json.loads((cfg.run_dir / "eval" / "val-model.json").read_text())["step"] is None


def test_all_checkpoints_scores_base_and_every_valid_checkpoint(evaluated_run, base_model):
    cfg, table = evaluated_run
    eval_dir = cfg.run_dir / "eval"
    over = json.loads((eval_dir / "val-over-steps.json").read_text())
    assert [r["step"] for r in over] == [0, 2, 4]  # checkpoint-6 has no COMPLETE
    assert over[0]["model"] == str(base_model) and all(r["n"] == 5 for r in over)
    assert all("records" not in r for r in over)
    for step in (0, 2, 4):
        assert len(json.loads((eval_dir / f"val-step{step}.json").read_text())["records"]) == 5
    assert (eval_dir / "accuracy_over_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table.count("\n| 4 |") == 2  # one score row and one error row per step
    assert not list(eval_dir.glob(".*.tmp"))


def test_compare_table_and_plot(tmp_path, evaluated_run, base_model):
    cfg, _ = evaluated_run
    rows = [
        {"time": "2025-01-01T00:00:00", "step": s, "reward": s / 10, "rewards/exact/mean": s / 10}
        for s in (1, 2, 3)
    ]
    (cfg.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = make_run(tmp_path, "beta", base_model)
    (other.run_dir / "metrics.jsonl").write_text(
        json.dumps(rows[0] | {"reward": 0.7}) + "\n" + '{"step": 2, "rew'
    )
    out = tmp_path / "cmp" / "compare.png"
    assert main(["compare", str(cfg.run_dir), str(other.run_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    table = out.with_suffix(".md").read_text()
    alpha = next(line for line in table.splitlines() if line.startswith("| alpha |"))
    beta = next(line for line in table.splitlines() if line.startswith("| beta |"))
    assert "| 3 |" in alpha and "| 4 |" in alpha and "0.300 (3)" in alpha  # 3 points, latest step 4
    assert "0.700 (1)" in beta  # the torn last line is skipped
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_cli_subprocess_exit_status(tmp_path, base_model):
    cfg = make_run(tmp_path, "sub", base_model, steps=(1,))
    leak = TrainProblems(make_task(cfg.task), cfg.data, cfg.training.seed).problem(0)
    write_problems([leak], cfg.run_dir / "data" / "test.jsonl")
    cmd = [sys.executable, "-m", "rlarith.cli", "eval", str(cfg.run_dir)]
    env = {k: v for k, v in os.environ.items() if k != "SCRATCH"} | {"OMP_NUM_THREADS": "1"}
    kw = dict(capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    refused = subprocess.run(cmd + ["--split", "test"], **kw)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr and "--force" in refused.stderr
    ok = subprocess.run(cmd + ["--n", "2"], **kw)
    assert ok.returncode == 0, ok.stderr
    assert "| 1 | checkpoint-1 | val | 2 x 1 |" in ok.stdout


# ---- refusals that name their fix ------------------------------------------------------------------------


def traced_run(tmp_path: Path, base_model: Path, name: str) -> tuple[RunConfig, list[Problem]]:
    """A run whose traces show it trained on two problems of the held-out set its config builds."""
    from rlarith.config import TraceConfig
    from rlarith.traces import TraceWriter

    cfg = make_run(tmp_path, name, base_model, steps=(1,))
    cfg = load_config(
        cfg.run_dir / "config.yaml", ["data.test_size=50"]
    )  # the 2-digit task's test bucket is small
    save_config(cfg, cfg.run_dir / "config.yaml")
    val = heldout(make_task(cfg.task), cfg.data, "val", cfg.data.val_size)
    with TraceWriter(
        cfg.run_dir / "traces", run_id="r", rank=0, attempt="a", attempt_seq=0, cfg=TraceConfig()
    ) as w:
        for step, p in enumerate((val[1], val[4]), start=1):
            w.write_step(step, {"key": [p.key], "prompt": ["p"], "completion": ["c"]})
    return cfg, val


def test_the_contamination_refusal_names_a_fix_that_works(tmp_path, base_model, capsys):
    """The refusal is labelled as one, and the command it suggests rebuilds the held-out set without
    what the traces show, after which the same eval runs clean."""
    cfg, val = traced_run(tmp_path, base_model, "leaky")
    assert main(["eval", str(cfg.run_dir), "--n", "6"]) == 2
    err = capsys.readouterr().err
    assert "rlarith: contamination refusal: 2 of 6 held-out problems" in err and "config error" not in err
    fix = re.search(r"`(rlarith data check [^`]+)`", err).group(1)
    assert main(fix.split()[1:]) == 0  # the suggested command, as printed
    out = capsys.readouterr().out
    assert "excluded" in out and f"wrote val: {cfg.run_dir / 'data' / 'val.jsonl'}" in out
    rebuilt = read_problems(cfg.run_dir / "data" / "val.jsonl")
    assert len(rebuilt) == cfg.data.val_size and not {val[1].key, val[4].key} & {p.key for p in rebuilt}
    assert main(["eval", str(cfg.run_dir), "--n", "6"]) == 0
    saved = json.loads((cfg.run_dir / "eval" / "val-step1.json").read_text())
    assert saved["contaminated"] == 0 and saved["unreadable_traces"] == []


def test_unreadable_traces_refuse_the_eval_unless_forced(tmp_path, base_model, capsys):
    """A truncated shard may have held a held-out problem: eval refuses, naming the file; --force scores
    and records the file in the result."""
    cfg, _ = traced_run(tmp_path, base_model, "torn")
    write_problems(
        heldout(make_task(cfg.task), cfg.data, "val", 30)[10:16], cfg.run_dir / "data" / "val.jsonl"
    )
    (shard,) = (cfg.run_dir / "traces").glob("*.h5")
    with open(shard, "r+b") as fh:  # the lost steps held val[1] and val[4]; this set has neither
        fh.truncate(shard.stat().st_size // 2)
    assert main(["eval", str(cfg.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "rlarith: unreadable traces:" in err and str(shard) in err and "--force" in err
    assert not (cfg.run_dir / "eval").exists()
    assert main(["eval", str(cfg.run_dir), "--force"]) == 0
    saved = json.loads((cfg.run_dir / "eval" / "val-step1.json").read_text())
    assert saved["unreadable_traces"] == [str(shard)] and saved["contaminated"] == 0
    assert "unreadable traces: 1" in capsys.readouterr().out


def test_data_check_writes_only_where_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "positive_control.yaml"
    assert main(["data", "check", "-c", str(config)]) == 0
    assert list(tmp_path.iterdir()) == []  # no runs/positive_control/ as a side effect
    assert "not written (pass --out DIR" in capsys.readouterr().out
    assert main(["data", "check", "-c", str(config), "--out", str(tmp_path / "sets")]) == 0
    assert sorted(p.name for p in (tmp_path / "sets").iterdir()) == ["test.jsonl", "val.jsonl"]


def test_compare_names_missing_runs_and_says_how_to_fill_empty_ones(
    tmp_path, evaluated_run, base_model, capsys
):
    cfg, _ = evaluated_run
    nope = tmp_path / "nope"
    assert main(["compare", str(cfg.run_dir), str(nope), "--out", str(tmp_path / "c.png")]) == 2
    assert repr(str(nope)) in capsys.readouterr().err
    fresh = make_run(tmp_path, "fresh", base_model)
    (fresh.run_dir / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "reward": r}) + "\n"
            for s, r in ((1, 0.1), (2, 0.9), (3, 0.9), (2, 0.2), (3, 0.3))
        )
    )  # a resume from step 1 re-ran steps 2-3: the final history is 0.1, 0.2, 0.3
    assert metrics.read(fresh.run_dir) == [
        {"step": 1, "reward": 0.1, "attempt": None},
        {"step": 2, "reward": 0.2, "attempt": None},
        {"step": 3, "reward": 0.3, "attempt": None},
    ]
    assert main(["compare", str(cfg.run_dir), str(fresh.run_dir), "--out", str(tmp_path / "c.png")]) == 0
    row = next(line for line in (tmp_path / "c.md").read_text().splitlines() if line.startswith("| fresh |"))
    assert (
        f"not evaluated: `rlarith eval {fresh.run_dir} --all-checkpoints --split val`" in row
        and "0.300 (3)" in row
    )


# ---- a run directory that scratch was hostile to -----------------------------------------------------------


def record_config(cfg: RunConfig, step: int) -> None:
    """What the trainer seals into every checkpoint: the run's config (``flat``) beside the policy state."""
    from rlarith.checkpoints import STATE_FILE, checkpoint_path
    from rlarith.config import flat

    (checkpoint_path(cfg.run_dir, step) / STATE_FILE).write_text(json.dumps({"config": flat(cfg)}))


def test_an_empty_config_yaml_is_never_read_as_the_defaults(tmp_path, base_model, capsys):
    """A crash leaves config.yaml empty: eval scores with the config sealed into the checkpoint (addition,
    as trained; the defaults would be 3-digit x 2-digit multiplication), says so and how to restore the
    file; `rlarith config --run` restores it. Without a copy in a checkpoint, eval refuses with the fix."""
    cfg = make_run(tmp_path, "crashed", base_model, steps=(2,))
    record_config(cfg, 2)
    saved = cfg.run_dir / "config.yaml"
    saved.write_bytes(b"")
    assert main(["eval", str(cfg.run_dir), "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert (
        f"{saved} is empty (0 bytes): using the config sealed into" in out and "rlarith config --run" in out
    )
    records = json.loads((cfg.run_dir / "eval" / "val-step2.json").read_text())["records"]
    assert len(records) == 3 and all(" + " in r["question"] for r in records), records
    assert main(["config", "--run", str(cfg.run_dir)]) == 0
    restored = capsys.readouterr()
    assert "is empty (0 bytes)" in restored.err and "op: +" in restored.out
    saved.write_text(restored.out)
    assert load_config(saved) == cfg  # the checkpoint's copy is the whole config

    # Zero bytes of the right length (what some filesystems leave), and no copy in any checkpoint.
    other = make_run(tmp_path, "older", base_model, steps=(2,))
    (other.run_dir / "config.yaml").write_bytes(b"\0" * 300)
    assert main(["eval", str(other.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "is empty (300 bytes, all zero)" in err and "never reads it as the default config" in err
    assert f"rlarith config -c FILE [key=value ...] > {other.run_dir / 'config.yaml'}" in err
    (other.run_dir / "config.yaml").write_text("name: older\ntask: {op: '+'\n")  # cut short
    assert main(["eval", str(other.run_dir / "checkpoints" / "checkpoint-2")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def prune_like_retention(checkpoint: Path) -> None:
    """Delete a checkpoint as rlarith.checkpoints.prune does: COMPLETE first, then the files."""
    import shutil

    (checkpoint / "COMPLETE").unlink()
    shutil.rmtree(checkpoint)


def test_checkpoints_pruned_while_eval_runs_are_skipped_and_the_rest_scored(tmp_path, base_model):
    """--all-checkpoints beside a training run: retention deletes listed checkpoints while the models load
    (a thread removing them one by one, as prune does, once the first result is written). Each listed
    checkpoint is scored or skipped with a line saying so; nothing fails."""
    import threading

    cfg = make_run(tmp_path, "live", base_model, steps=(2, 4, 6, 8, 10))
    started, lines = threading.Event(), []

    def log(line: str) -> None:
        lines.append(line)
        started.set()

    def retention() -> None:
        started.wait(60)
        for step in (4, 6, 8):
            prune_like_retention(cfg.run_dir / "checkpoints" / f"checkpoint-{step}")

    pruner = threading.Thread(target=retention)
    pruner.start()
    results = run_eval(
        resolve_target(cfg.run_dir), EvalSettings(n=3), all_checkpoints=True, progress=False, log=log
    )
    pruner.join()
    scored = {r.step for r in results}
    skipped = {
        int(m)
        for line in lines
        for m in re.findall(r"^skipped checkpoint-(\d+): deleted after it was listed", line)
    }
    assert scored | skipped == {0, 2, 4, 6, 8, 10} and not scored & skipped, lines
    assert {0, 2, 10} <= scored and skipped, lines  # the pruner ran while the eval did
    assert any(f"{len(skipped)} checkpoint(s) deleted before they were scored" in line for line in lines)
    over = json.loads((cfg.run_dir / "eval" / "val-over-steps.json").read_text())
    assert sorted(r["step"] for r in over) == sorted(scored)


def test_the_latest_checkpoint_pruned_before_it_loads_gives_way_to_the_new_latest(tmp_path, base_model):
    cfg = make_run(tmp_path, "moving", base_model, steps=(2, 4))
    target = resolve_target(cfg.run_dir)
    assert target.step == 4
    # The run saves checkpoint-6 and retention deletes checkpoint-4 between listing and loading.
    (init_model(cfg.run_dir / "checkpoints" / "checkpoint-6", seed=30) / "COMPLETE").write_text("")
    prune_like_retention(cfg.run_dir / "checkpoints" / "checkpoint-4")
    lines: list[str] = []
    [result] = run_eval(target, EvalSettings(n=2), progress=False, log=lines.append)
    assert result.step == 6 and result.model == str(cfg.run_dir / "checkpoints" / "checkpoint-6")
    assert any("checkpoint-4 was deleted by the run's retention while it was loading" in line and
               "scoring checkpoint-6, now the latest valid checkpoint" in line for line in lines), lines  # fmt: skip
    # A checkpoint the user named is not replaced by another: a clear error instead of a loader's.
    named = resolve_target(cfg.run_dir / "checkpoints" / "checkpoint-6")
    prune_like_retention(cfg.run_dir / "checkpoints" / "checkpoint-6")
    with pytest.raises(
        ConfigError, match="checkpoint-6' was deleted before it could be scored.*evaluate the run"
    ):
        run_eval(named, EvalSettings(n=2), progress=False, log=lines.append)
