"""Per-step cost of rlarith's trainer against bare TRL GRPOTrainer (driven by benchmarks/gpu_overhead.sh).

    python benchmarks/gpu_overhead.py build --out /tmp/m05 --shape full       # random Qwen2.5-0.5B-shaped Llama
    python benchmarks/gpu_overhead.py bare --model /tmp/m05 --out /tmp/bench/bare --steps 25 --prompts 32
    python benchmarks/gpu_overhead.py report --steps 25 --out results.md a=DIR b=DIR c=DIR a2=DIR

``bare`` runs TRL's own GRPOTrainer (no rlarith subclass, callbacks or traces) on exactly the workload of
``rlarith train -c configs/positive_control.yaml``: the same dataset rows (build_dataset, the same seeded
problem order), the very GRPOConfig rlarith builds, the same reward functions and weights (``bare_trainer``,
also used in-process by benchmarks/checkpoint_save.py; benchmarks/step_overhead.py is this comparison on
CPU, its runs alternated).
It writes ``<out>/metrics.jsonl`` in rlarith's format (one line per logged step: ISO time, step, TRL's logs),
so ``report`` reads all runs the same way:

- ``step_time``: TRL's own metric, the time inside ``training_step`` (generation, rewards, rlarith's trace
  recording, forward, backward; not the optimizer step or the callbacks);
- wall: the difference between consecutive log lines' times (everything, callbacks and optimizer included).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rlarith.training.grpo_config import build_dataset, grpo_config, reward_functions
from rlarith.training.identity import iso_time
from rlarith.training.sealing import checkpoint_contents  # noqa: F401 (for checkpoint_save.py)

SHAPES = {
    # Qwen2.5-0.5B's shape as a Llama (transformers 5 reloads the character tokenizer exactly with a Llama).
    "full": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
}  # fmt: skip


def cmd_build(args: argparse.Namespace) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlarith.tinymodel import build_tokenizer

    started = time.time()
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=151936,  # larger than the tokenizer's 103 ids on purpose: Qwen's embedding and LM head
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **SHAPES[args.shape],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is fast on the GPU
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {args.shape} Llama: {params / 1e6:.1f}M parameters, {len(tok)} token ids, "
          f"saved to {out} in {time.time() - started:.1f} s")  # fmt: skip
    return 0


WORKLOAD = [  # the gpu-baseline workload (shared/notes/gpu-baseline.md); gpu_overhead.sh gives rlarith the same
    "training.num_generations=8",
    "training.max_completion_length=8",
    "training.learning_rate=1e-6",
    "training.deepspeed=none",
    "training.report_to=[]",
]


def bare_trainer(model: Any, out: Path, steps: int, prompts: int, dtype: str) -> Any:
    """TRL's own GRPOTrainer on the workload ``rlarith train -c configs/positive_control.yaml`` runs with
    the same overrides: the same dataset rows (build_dataset, the same seeded problem order), the very
    GRPOConfig rlarith builds (one rank, no DeepSpeed), the same reward functions and weights. ``model``: a
    folder or a model object. A callback appends rlarith's metrics.jsonl line (ISO time, step, logs) to
    ``out/metrics.jsonl``; nothing else of rlarith's runs."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOTrainer

    from rlarith.config import load_config
    from rlarith.data import TrainProblems, make_task
    from rlarith.rewards import REWARD_FUNCTIONS
    from rlarith.tinymodel import build_tokenizer

    path = model if isinstance(model, (str, Path)) else "unused"
    overrides = [f"model.path={path}", f"model.dtype={dtype}", f"training.max_steps={steps}",
                 f"training.prompts_per_step={prompts}", *WORKLOAD, f"runs_dir={out}"]  # fmt: skip
    cfg = load_config("configs/positive_control.yaml", overrides)
    t = cfg.training
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)

    if isinstance(model, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model))
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    else:
        tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = build_dataset(cfg, TrainProblems(make_task(cfg.task), cfg.data, t.seed))
    weights = [float(cfg.rewards.weights.get(n, 0.0)) for n in REWARD_FUNCTIONS]
    grpo_args = grpo_config(cfg, t.prompts_per_step * t.num_generations, None, weights)

    class Metrics(TrainerCallback):
        """rlarith's metrics.jsonl line (ISO time, step, logs), nothing else."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
            if logs and state.is_world_process_zero:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps({"time": iso_time(), "step": state.global_step, **logs}) + "\n")
            return control

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_functions(cfg, {}),
        args=grpo_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Metrics())
    return trainer


def cmd_bare(args: argparse.Namespace) -> int:
    import torch

    trainer = bare_trainer(args.model, Path(args.out), args.steps, args.prompts, args.dtype)
    a = trainer.args
    print(f"bare TRL: {a.max_steps} steps x {a.per_device_train_batch_size} completions, "
          f"bf16={a.bf16}, device={trainer.accelerator.device}", flush=True)  # fmt: skip
    trainer.train()
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"finished at step {trainer.state.global_step}")
    return 0


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def step_series(path: Path, first: int, last: int) -> dict[str, list[float]]:
    """Per-step values of steps first..last of one run's metrics.jsonl (a missing file gives empty lists):
    ``step_time`` (TRL's), ``wall`` (the gap to the previous step's line), ``write_s`` (the trace recorder's)
    and ``reward``."""
    rows = []
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step_time" in r]
    times = {r["step"]: _seconds(r["time"]) for r in rows}
    used = [r for r in rows if first <= r["step"] <= last]
    return {
        "step_time": [r["step_time"] for r in used],
        "wall": [times[r["step"]] - times[r["step"] - 1] for r in used if r["step"] - 1 in times],
        "write_s": [r["traces/write_s"] for r in used if "traces/write_s" in r],
        "share": [
            r["traces/write_s"] / r["step_time"] for r in used if "traces/write_s" in r and r["step_time"]
        ],
        "reward": [r.get("reward", 0.0) for r in used],
    }


def run_stats(path: Path, first: int, last: int) -> dict[str, Any]:
    """Medians over steps first..last of one run's metrics.jsonl (a missing file gives empty stats)."""
    s = step_series(path, first, last)
    med = statistics.median
    return {
        "n": len(s["step_time"]),
        "step_time": med(s["step_time"]) if s["step_time"] else None,
        "wall": med(s["wall"]) if s["wall"] else None,
        "write_s": med(s["write_s"]) if s["share"] else None,
        "share": med(s["share"]) if s["share"] else None,
        "reward": statistics.fmean(s["reward"]) if s["reward"] else None,
    }


def cmd_report(args: argparse.Namespace) -> int:
    labels = {
        "a": "bare TRL GRPOTrainer",
        "b": "rlarith train, traces.enabled=false",
        "c": "rlarith train, traces on",
        "a2": "bare TRL GRPOTrainer again (drift)",
    }
    first, last = 3, args.steps - 1
    stats = {}
    for item in args.runs:
        key, _, path = item.partition("=")
        stats[key] = run_stats(Path(path), first, last)

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    def ratio(x: float | None, ref: float | None) -> str:
        return "-" if x is None or not ref else f"{x / ref:.3f}"

    ref = stats.get("a", {})
    refs = [s.get("step_time") for k, s in stats.items() if k in ("a", "a2") and s.get("step_time")]
    ref_mean = statistics.fmean(refs) if refs else None
    lines = [
        f"Median over steps {first}..{last} (per step: {args.completions} completions). step_time: TRL's own "
        "metric (time inside training_step); wall: between consecutive metrics.jsonl lines (everything).",
        "",
        "| run | what | steps | step_time s | vs a | vs mean(a, a2) | wall s | wall vs a "
        "| traces write_s | write_s / step_time | mean reward |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in stats.items():
        lines.append(
            f"| {key} | {labels.get(key, key)} | {s['n']} | {fmt(s['step_time'], '.4f')} "
            f"| {ratio(s['step_time'], ref.get('step_time'))} | {ratio(s['step_time'], ref_mean)} "
            f"| {fmt(s['wall'], '.4f')} | {ratio(s['wall'], ref.get('wall'))} "
            f"| {fmt(s['write_s'], '.4f')} | {fmt(s['share'], '.2%')} | {fmt(s['reward'], '.3f')} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all(s["n"] for s in stats.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("build")
    p.add_argument("--out", required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="full")
    p = sub.add_parser("bare")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p = sub.add_parser("report")
    p.add_argument("runs", nargs="+", metavar="key=metrics.jsonl")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--completions", type=int, default=256)
    p.add_argument("--out", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"build": cmd_build, "bare": cmd_bare, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
