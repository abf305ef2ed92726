"""What every benchmark result file starts with: when, on what machine, with which versions, by which command.

    from benchenv import write_results      # the scripts in benchmarks/ run with benchmarks/ on sys.path
    write_results("benchmarks/results/x.md", "Title", table_markdown)

Numbers from a shared 2-core machine move with the load of everything else on it: the header records the
load average at the start and at the end of the run, so a reader can tell a quiet run from a busy one.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "accelerate",
    "datasets",
    "safetensors",
    "h5py",
    "zstandard",
    "xxhash",
)
STARTED = (time.time(), os.getloadavg())  # imported first thing by every script: the run's start


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_gib() -> str:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        return "?"


def _git() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rlarith", "benchmarks"], cwd=REPO,
                               capture_output=True, text=True)  # fmt: skip
        return rev.stdout.strip() + (
            " (+ uncommitted changes in rlarith/ or benchmarks/)" if dirty.stdout.strip() else ""
        )
    except OSError:
        return "?"


def versions() -> str:
    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def header(title: str) -> str:
    """Markdown: the title, the command that made the file, date, machine, versions, commit, load."""
    started, load0 = STARTED
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    return "\n".join([
        f"# {title}",
        "",
        f"    {command}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
        f"{time.time() - started:.0f} s in all",
        f"- machine: {platform.node()}, {_cpu()}, {os.cpu_count()} cores, {_mem_gib()}{gpu}, "
        f"{platform.system()} {platform.release()}",
        f"- load average (1 min) at start {load0[0]:.1f}, at end {os.getloadavg()[0]:.1f}"
        f" (torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')})",
        f"- python {platform.python_version()}; {versions()}",
        f"- rlarith commit {_git()}",
        "",
    ])  # fmt: skip


def set_threads(n: int) -> None:
    """torch's intra-op threads, for this process and the ones it starts; call before torch is imported.
    On a shared 2-core machine 2 threads collapse under contention (a tiny-model GRPO step measured 0.7 s
    with 1 thread and 2.6-14 s with 2, minutes apart), so the CPU benchmarks default to 1."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)


def write_results(path: str | Path, title: str, body: str) -> Path:
    """Write header + body to ``path`` (folders made as needed) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header(title) + "\n" + body.rstrip() + "\n")
    return path
