"""The trainer inside a container image: the runtime's command line, the folders bound into it, the
environment that crosses into it, and the check that the image's rlarith reads the config this one wrote.

``slurm.container_runtime`` picks the runtime; each runs the image's ``rlarith`` with the host's folders
bound at the same paths, so every path in the frozen config means the same file inside:

- ``apptainer`` (or ``singularity``): ``apptainer exec --cleanenv [--nv] --bind P ... IMAGE rlarith ...``;
  the variables the trainer needs go in as ``APPTAINERENV_<NAME>``. It runs as the host user.
- ``ch-run`` (charliecloud, an unprivileged runtime with apptainer's model): the image is a directory
  (``ch-convert``), read-only; ``--unset-env='*'`` then the image's own environment, then ours.
- ``podman``: ``podman run --rm`` as the host user (``--user UID:GID``), host network and IPC (NCCL and
  DeepSpeed's shared memory between ranks), the image's entrypoint being ``rlarith``.

The environment is clean: a host ``PYTHONPATH`` or ``~/.local`` site-packages would replace the image's
pinned stack (``PYTHONNOUSERSITE=1``). What crosses: the rank variables, SLURM's, rlarith's, NCCL's and
the thread counts (``PASSED``).

This module imports no torch: the job driver on the host uses it.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Mapping
from pathlib import Path

from rlarith.config import RunConfig, schema_id

RUNTIMES = ("apptainer", "singularity", "ch-run", "podman")
"""What ``slurm.container_runtime`` may name (a bare name on PATH, or a path to one of these)."""
PASSED = (
    *("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    *("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM"),
    *("DS_ACCELERATOR", "SCRATCH", "PYTHONUNBUFFERED"),
)
"""Variables passed into the container by name (besides the prefixes below)."""
PASSED_PREFIXES = ("SLURM_", "RLARITH_", "NCCL_")


def kind(cfg: RunConfig) -> str:
    """``apptainer``, ``ch-run`` or ``podman`` (singularity counts as apptainer)."""
    name = Path(cfg.slurm.container_runtime).name
    return "apptainer" if name == "singularity" else name


def binds(cfg: RunConfig, config_path: Path) -> list[Path]:
    """Host folders the trainer needs, bound at the same path: the runs, the frozen config's folder, the
    model, the traces, ``$SCRATCH`` and the folder of a DeepSpeed JSON of the user's own. The job driver
    creates the ones that do not exist yet (a runtime refuses a missing bind source)."""
    out = {Path(cfg.runs_dir), config_path.parent}
    if Path(cfg.model.path).is_absolute():
        out.add(Path(cfg.model.path))
    if cfg.traces.dir:
        out.add(Path(cfg.traces.dir))
    if os.environ.get("SCRATCH"):
        out.add(Path(os.environ["SCRATCH"]))
    if cfg.training.deepspeed not in ("none", "zero2", "zero3"):
        out.add(Path(cfg.training.deepspeed).parent)
    # A folder inside another bound one is bound already.
    return sorted(p for p in out if not any(q != p and q in p.parents for q in out))


def create_bind_sources(cfg: RunConfig, config_path: Path) -> None:
    """Create the bound folders that do not exist yet (not the model: a missing model is an error)."""
    for path in binds(cfg, config_path):
        if path != Path(cfg.model.path):
            path.mkdir(parents=True, exist_ok=True)


def passed_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` that crosses into the container, plus ``PYTHONNOUSERSITE=1``."""
    out = {k: v for k, v in env.items() if k in PASSED or k.startswith(PASSED_PREFIXES)}
    out["PYTHONNOUSERSITE"] = "1"
    return out


def command(
    cfg: RunConfig, args: list[str], env: Mapping[str, str], config_path: Path | None = None
) -> tuple[list[str], dict[str, str]]:
    """``rlarith ARGS`` inside the image: the command line and the environment to start it with; with
    ``config_path``, the run's folders bound (``binds``)."""
    runtime, image, gpus = cfg.slurm.container_runtime, cfg.slurm.container, cfg.slurm.gpus_per_node > 0
    folders = [str(p) for p in binds(cfg, config_path)] + list(cfg.slurm.binds) if config_path else []
    inner = passed_env(env)
    # The runtime itself runs with the host's environment (it needs PATH, HOME, XDG_RUNTIME_DIR ...).
    outer = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    which = kind(cfg)
    if which == "ch-run":
        outer.setdefault("USER", pwd.getpwuid(os.getuid()).pw_name)  # ch-run refuses to start without it
        return [
            runtime,
            "--unset-env=*",
            "--set-env",  # the image's own environment (its ENV lines), then ours
            "--env-no-expand",
            *[f"--set-env={k}={v}" for k, v in sorted(inner.items())],
            *[f"--bind={b}" for b in folders],
            image,
            "--",
            "rlarith",
            *args,
        ], outer
    if which == "podman":
        return [
            runtime,
            "run",
            "--rm",
            "--network=host",
            "--ipc=host",
            f"--user={os.getuid()}:{os.getgid()}",
            *(["--device=nvidia.com/gpu=all"] if gpus else []),
            *[f"--volume={b}" if ":" in b else f"--volume={b}:{b}" for b in folders],
            *[f"--env={k}={v}" for k, v in sorted(inner.items())],
            image,
            *args,  # the entrypoint is rlarith
        ], outer
    outer.update({f"APPTAINERENV_{k}": v for k, v in inner.items()})
    return [
        runtime,
        "exec",
        "--cleanenv",
        *(["--nv"] if gpus else []),
        *[arg for b in folders for arg in ("--bind", b)],
        image,
        "rlarith",
        *args,
    ], outer


def version_mismatch(cfg: RunConfig, env: Mapping[str, str]) -> str | None:
    """None when the image's rlarith reads configs as this one writes them (``rlarith version``: the
    same config schema), else one paragraph saying what differs and what to do."""
    argv, start_env = command(cfg, ["version"], env)
    try:
        out = subprocess.run(argv, env=start_env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"slurm.container_runtime: cannot run {argv[0]!r} ({err}); install it on the compute nodes"
    mine = f"rlarith {version()} (config schema {schema_id()})"
    said = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode == 0 and said == mine:
        return None
    theirs = said if out.returncode == 0 else "an rlarith without `rlarith version` (older than this one)"
    detail = "" if out.returncode == 0 else f" ({(out.stderr.strip().splitlines() or ['no output'])[-1]})"
    return (
        f"slurm.container: the image {cfg.slurm.container} has {theirs}{detail}, but the config was written "
        f"by {mine} on the host, and a config is read strictly (an unknown key fails every attempt). "
        "Rebuild the image from the same checkout (Containerfile, apptainer.def), or submit with the "
        "rlarith the image has."
    )


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("rlarith")
    except metadata.PackageNotFoundError:
        return "unknown"
