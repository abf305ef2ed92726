"""Checkpoint saves on CPU, synchronous and overlapped, against raw disk throughput, in one run (issue 11.1).

    .venv/bin/python benchmarks/checkpoint_save.py [--rounds 3] [--steps 3] [--dir /tmp]

A ~110M-parameter Llama built from a config (hidden 768, 12 layers, vocab 32,000 tied; random weights, no
download) trains ``--steps`` real GRPO steps with bare TRL's GRPOTrainer (gpu_overhead.bare_trainer: the
positive-control workload, 2 prompts x 8 completions of 8 tokens, float32), so AdamW's state exists. Then,
``--rounds`` times, rotating which goes first:
- sync: the full training state saved the way rlarith's trainer saves a stop or the final step: the HF
  Trainer's ``_save_checkpoint`` (weights, optimizer, scheduler, RNG, trainer state) into the staging
  folder, then ``rlarith.checkpoints.seal`` (checksum and fsync of every file, COMPLETE, rename), with
  ``checkpoint_contents`` as the required files;
- overlapped: the same save as rlarith's trainer makes it by default (rlarith.training.async_save): the
  step pays for ``_save_checkpoint`` under ``capture`` (small files written, the state copied into host
  buffers allocated at the first save and reused), then a ``BackgroundWriter`` writes, fsyncs and seals
  while the training thread keeps computing (forward + backward passes of the same model, counted). The
  stall is the capture plus the compute the training thread lost while the write ran (its passes' time
  against the same passes alone, measured right after);
- dd: ``dd if=/dev/zero bs=1M count=<checkpoint MiB> conv=fsync`` into the same folder.
The table gives seconds, GB, GB/s and ratios to raw disk and to the synchronous save, and the share of wall
time the default policy (a save every 20 steps) spends saving. Written to
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


def passes(model, batch, n: int) -> float:
    """Seconds for ``n`` forward + backward passes of ``model`` on ``batch``: the training thread's work."""
    started = time.perf_counter()
    for _ in range(n):
        model(input_ids=batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def overlapped(trainer, run_dir: Path, buffers, batch) -> dict[str, float]:
    """rlarith's overlapped save: capture (the step's part), then the background write and seal while the
    training thread runs passes; the passes are then timed alone to price the interference."""
    from rlarith.checkpoints import checkpoint_path, seal, staging_dir, tree_bytes
    from rlarith.training.async_save import BackgroundWriter, Snapshot, capture

    step = trainer.state.global_step
    started = time.perf_counter()
    snapshot = Snapshot(buffers)
    with capture(snapshot):
        trainer._save_checkpoint(trainer.model, None)
    captured = time.perf_counter()
    final = checkpoint_path(run_dir, step)
    sealed: dict[str, float] = {}

    def seal_it(write_s: float, known: dict[str, dict]) -> None:
        seal(staging_dir(run_dir) / f"checkpoint-{step}", final, {"step": step},
             required=checkpoint_contents(step, 1, False), known=known)  # fmt: skip
        sealed["at"] = time.perf_counter()

    writer = BackgroundWriter(rank=0, world_size=1)
    writer.submit(snapshot, staging_dir(run_dir) / f"checkpoint-{step}", seal_it)
    n, busy = 0, 0.0
    while writer.busy:
        busy += passes(trainer.model, batch, 1)
        n += 1
    writer.wait()
    alone = passes(trainer.model, batch, n) if n else 0.0
    size = tree_bytes(final)
    shutil.rmtree(final)
    return {
        "capture": captured - started,
        "write": sealed["at"] - captured,
        "lost": max(0.0, busy - alone),
        "passes": n,
        "bytes": size,
    }


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
        from rlarith.training.async_save import HostBuffers

        buffers, batch = (
            HostBuffers(),
            torch.randint(3, 40, (2, 24), device=trainer.model.device),
        )  # short passes: the lost compute in finer steps
        first = overlapped(trainer, run_dir, buffers, batch)  # allocates the host buffers
        print(f"first overlapped save (buffers allocated): capture {first['capture']:.2f} s", flush=True)
        rows, mib = [], round(first["bytes"] / 2**20)
        for r in range(args.rounds):
            row: dict[str, float] = {}
            for what in ("sync", "overlapped", "dd")[r % 3 :] + ("sync", "overlapped", "dd")[: r % 3]:
                if what == "sync":
                    row["hf"], row["seal"], row["bytes"] = save(trainer, run_dir)
                elif what == "overlapped":
                    row.update({f"o_{k}": v for k, v in overlapped(trainer, run_dir, buffers, batch).items()})
                else:
                    row["dd"], row["dd_bytes"] = dd(run_dir, mib), mib * 2**20
            rows.append(row)
            print(f"round {r}: sync {row['hf'] + row['seal']:.2f} s, overlapped: capture {row['o_capture']:.2f} s "
                  f"+ lost compute {row['o_lost']:.2f} s, write {row['o_write']:.2f} s; dd {row['dd']:.2f} s",
                  flush=True)  # fmt: skip

    gb = rows[0]["bytes"] / 1e9
    total = [r["hf"] + r["seal"] for r in rows]
    save_s = med(total)
    stall = [r["o_capture"] + r["o_lost"] for r in rows]
    rates = [r["bytes"] / t / 1e9 for r, t in zip(rows, total)]
    o_rates = [r["o_bytes"] / r["o_write"] / 1e9 for r in rows]
    dd_rates = [r["dd_bytes"] / r["dd"] / 1e9 for r in rows]

    def spread(xs: list[float]) -> str:
        return f"{med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    def share(cost: float) -> str:
        return f"{cost / (SAVE_EVERY * step_s + cost):.1%}"

    lines = [
        f"Model: Llama {SHAPE}, {params / 1e6:.1f}M parameters, float32 weights + AdamW state, random weights. "
        f"Disk: the folder of the run ({args.dir or tempfile.gettempdir()}). {args.rounds} rounds, the three "
        f"rotating which goes first; median (min-max). torch threads {torch.get_num_threads()}.",
        "",
        "| what | seconds | GB | GB/s | vs raw disk | vs sync save |",
        "|---|---|---|---|---|---|",
        f"| raw disk: dd bs=1M conv=fsync | {spread([r['dd'] for r in rows])} | {rows[0]['dd_bytes'] / 1e9:.2f} "
        f"| {spread(dd_rates)} | 1.00 | |",
        f"| sync save: HF _save_checkpoint + seal (stall = all of it) | {spread(total)} | {gb:.2f} | {spread(rates)} "
        f"| {med(rates) / med(dd_rates):.2f} | 1.00 |",
        f"| of which HF _save_checkpoint (page cache, no fsync) | {spread([r['hf'] for r in rows])} | | | | |",
        f"| of which seal (read + XXH3 + fsync every file, COMPLETE, rename) | {spread([r['seal'] for r in rows])} "
        "| | | | |",
        f"| **overlapped: stall** (capture + compute lost to the writer) | {spread(stall)} | | | "
        f"| {med(stall) / save_s:.2f} |",
        f"| of which capture (small files + copy into reused buffers) | {spread([r['o_capture'] for r in rows])} "
        f"| | | | {med([r['o_capture'] for r in rows]) / save_s:.2f} |",
        f"| of which compute lost while the write ran ({med([r['o_passes'] for r in rows]):.0f} passes) "
        f"| {spread([r['o_lost'] for r in rows])} | | | | |",
        f"| overlapped: background write + fsync + seal | {spread([r['o_write'] for r in rows])} "
        f"| {rows[0]['o_bytes'] / 1e9:.2f} | {spread(o_rates)} | {med(o_rates) / med(dd_rates):.2f} | |",
        f"| first overlapped save's capture (buffers allocated) | {first['capture']:.2f} | | | "
        f"| {first['capture'] / save_s:.2f} |",
        "",
        f"One GRPO step of this model ({args.prompts} prompts x 8 completions, median wall of steps 2..{args.steps}): "
        f"{step_s:.2f} s. At the default policy (a save every {SAVE_EVERY} steps) saving stalls training for "
        f"{share(save_s)} of wall time with synchronous saves and {share(med(stall))} overlapped.",
        f"Issue 11.1's goals: stall <= 10% of the synchronous save (here {med(stall) / save_s:.0%}); the write "
        f"at >= 80% of raw disk (here {med(o_rates) / med(dd_rates):.0%}: the background write, fsync and seal, "
        f"against dd with fsync).",
    ]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    out = args.out or REPO / "benchmarks" / "results" / "checkpoint_save.md"
    print(
        f"written to {write_results(out, 'Checkpoint saves on CPU: synchronous, overlapped, raw disk', body)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
