"""Synchronous checkpoint save on CPU against raw disk throughput, side by side in one run (issue 11.1's baseline).

    .venv/bin/python benchmarks/checkpoint_save.py [--rounds 3] [--steps 3] [--dir /tmp]

A ~110M-parameter Llama built from a config (hidden 768, 12 layers, vocab 32,000 tied; random weights, no
download) trains ``--steps`` real GRPO steps with bare TRL's GRPOTrainer (gpu_overhead.bare_trainer: the
positive-control workload, 2 prompts x 8 completions of 8 tokens, float32), so AdamW's state exists. Then,
``--rounds`` times, alternating which goes first:
- save: the full training state the way rlarith saves it: the HF Trainer's ``_save_checkpoint`` (weights,
  optimizer, scheduler, RNG, trainer state) into the staging folder, then ``rlarith.checkpoints.seal``
  (checksum and fsync of every file, COMPLETE, rename into checkpoints/), with ``checkpoint_contents`` as
  the required files, exactly the calls of rlarith's trainer subclass;
- dd: ``dd if=/dev/zero bs=1M count=<checkpoint MiB> conv=fsync`` into the same folder;
- snapshot: a copy of the weights and AdamW state into fresh host memory (``clone``), and again into those
  copies (``copy_``, reused buffers): what an overlapped save must at least pay on the step's critical path.
The table gives seconds, GB, GB/s and the ratio to raw disk, the step time, the save/step ratio and the
share of wall time the default policy (a save every 20 steps) spends saving. Written to
benchmarks/results/checkpoint_save.md with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import REPO, set_threads, write_results
from gpu_overhead import checkpoint_contents, step_series

SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
SAVE_EVERY = 20  # checkpoints.save_every's default


def build_model():  # -> LlamaForCausalLM
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlarith.tinymodel import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **SHAPE
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def save(trainer, run_dir: Path) -> tuple[float, float, int]:
    """rlarith's save of the trainer's state: (HF write s, seal s, bytes). The checkpoint is removed after."""
    from rlarith.checkpoints import checkpoint_path, seal, staging_dir, tree_bytes

    step = trainer.state.global_step
    started = time.perf_counter()
    trainer._save_checkpoint(trainer.model, None)
    written = time.perf_counter()
    final = checkpoint_path(run_dir, step)
    seal(staging_dir(run_dir) / f"checkpoint-{step}", final, {"step": step},
         required=checkpoint_contents(step, 1, False))  # fmt: skip
    sealed = time.perf_counter()
    size = tree_bytes(final)
    shutil.rmtree(final)
    return written - started, sealed - written, size


def dd(folder: Path, mib: int) -> float:
    target = folder / "dd.bin"
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"], check=True,
                   capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def snapshot(trainer, buffers: list | None) -> tuple[float, list]:
    """Seconds to copy weights (tied ones once) and AdamW state into host tensors, and the copies: fresh
    ones (``clone``) when ``buffers`` is None, else into ``buffers`` (a previous call's copies, reused as a
    background writer would reuse its staging memory)."""
    import torch

    started = time.perf_counter()
    sources = list({t.data_ptr(): t.detach() for t in trainer.model.state_dict().values()}.values())
    for state in trainer.optimizer.state.values():
        sources += [v for v in state.values() if isinstance(v, torch.Tensor)]
    if buffers is None:
        copies = [t.clone() for t in sources]
    else:
        copies = buffers
        for dst, src in zip(copies, sources):
            dst.copy_(src)
    return time.perf_counter() - started, copies


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps before the saves (>= 2)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (x 8 completions)")
    parser.add_argument(
        "--dir", default=None, help="folder for the run (the disk measured); default: a temp dir"
    )
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (benchenv.set_threads)")
    args = parser.parse_args()
    set_threads(args.threads)
    import torch
    from gpu_overhead import bare_trainer

    med = statistics.median
    with tempfile.TemporaryDirectory(prefix="ckpt-save-", dir=args.dir) as tmp:
        model = build_model()
        params = sum(p.numel() for p in model.parameters())
        trainer = bare_trainer(model, Path(tmp), args.steps, args.prompts, "float32")
        run_dir = Path(trainer.args.output_dir).parent.parent  # output_dir is the run's staging folder
        print(f"{params / 1e6:.1f}M parameters; training {args.steps} steps in {run_dir}", flush=True)
        trainer.train()
        steps = step_series(run_dir.parent / "metrics.jsonl", 2, args.steps)
        step_s = med(steps["wall"])
        rows, mib = [], None
        for r in range(args.rounds):
            order = ("save", "dd") if r % 2 == 0 else ("dd", "save")
            row: dict[str, float] = {}
            for what in order:
                if what == "save":
                    row["hf"], row["seal"], row["bytes"] = save(trainer, run_dir)
                    mib = mib or round(row["bytes"] / 2**20)
                else:
                    row["dd"] = dd(run_dir, mib or 1300)
                    row["dd_bytes"] = (mib or 1300) * 2**20
            row["snap"], copies = snapshot(trainer, None)
            row["snap_bytes"] = sum(t.numel() * t.element_size() for t in copies)
            row["reuse"], copies = snapshot(trainer, copies)
            del copies
            rows.append(row)
            print(f"round {r}: save {row['hf'] + row['seal']:.2f} s (HF {row['hf']:.2f} + seal {row['seal']:.2f}), "
                  f"dd {row['dd']:.2f} s, snapshot {row['snap']:.2f} s", flush=True)  # fmt: skip

    gb = rows[0]["bytes"] / 1e9
    total = [r["hf"] + r["seal"] for r in rows]
    save_s = med(total)
    rates = [r["bytes"] / (r["hf"] + r["seal"]) / 1e9 for r in rows]
    dd_rates = [r["dd_bytes"] / r["dd"] / 1e9 for r in rows]
    snap_s, reuse_s = med([r["snap"] for r in rows]), med([r["reuse"] for r in rows])

    def spread(xs: list[float]) -> str:
        return f"{med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    share = save_s / (SAVE_EVERY * step_s + save_s)
    lines = [
        f"Model: Llama {SHAPE}, {params / 1e6:.1f}M parameters, float32 weights + AdamW state, random weights. "
        f"Disk: the folder of the run ({args.dir or tempfile.gettempdir()}). {args.rounds} rounds, save and dd "
        f"alternating which goes first; median (min-max). torch threads {torch.get_num_threads()}.",
        "",
        "| what | seconds | GB | GB/s | vs raw disk |",
        "|---|---|---|---|---|",
        f"| raw disk: dd bs=1M conv=fsync | {spread([r['dd'] for r in rows])} | {rows[0]['dd_bytes'] / 1e9:.2f} "
        f"| {spread(dd_rates)} | 1.00 |",
        f"| rlarith save: HF _save_checkpoint + seal | {spread(total)} | {gb:.2f} | {spread(rates)} "
        f"| {med(rates) / med(dd_rates):.2f} |",
        f"| of which HF _save_checkpoint (page cache, no fsync) | {spread([r['hf'] for r in rows])} | | | |",
        f"| of which seal (read + XXH3 + fsync every file, COMPLETE, rename) | {spread([r['seal'] for r in rows])} "
        "| | | |",
        f"| snapshot into host memory (clone weights + AdamW state) | {spread([r['snap'] for r in rows])} "
        f"| {rows[0]['snap_bytes'] / 1e9:.2f} | {med([r['snap_bytes'] / r['snap'] / 1e9 for r in rows]):.2f} | |",
        f"| the same copy into reused buffers (copy_) | {spread([r['reuse'] for r in rows])} "
        f"| {rows[0]['snap_bytes'] / 1e9:.2f} | {med([r['snap_bytes'] / r['reuse'] / 1e9 for r in rows]):.2f} | |",
        "",
        f"One GRPO step of this model ({args.prompts} prompts x 8 completions, median wall of steps 2..{args.steps}): "
        f"{step_s:.2f} s. Save / step: {save_s / step_s:.2f}. At the default policy (a save every {SAVE_EVERY} "
        f"steps) saving takes {share:.1%} of wall time.",
        f"Issue 11.1's goals against these numbers: stall <= 10% of the synchronous save = {0.1 * save_s:.2f} s "
        f"(a snapshot into fresh memory took {snap_s:.2f} s, {snap_s / save_s:.0%} of it; into reused buffers "
        f"{reuse_s:.2f} s, {reuse_s / save_s:.0%}); the background write at >= 80% "
        f"of raw disk = {0.8 * med(dd_rates):.2f} GB/s, i.e. this checkpoint in <= {gb / (0.8 * med(dd_rates)):.2f} s "
        f"(today's synchronous save reaches {med(rates) / med(dd_rates):.0%} of raw disk).",
    ]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    out = args.out or REPO / "benchmarks" / "results" / "checkpoint_save.md"
    print(f"written to {write_results(out, 'Synchronous checkpoint save vs raw disk on CPU', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
