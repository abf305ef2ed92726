"""``rlarith doctor``: can this machine (or this image) run this config? The first command on a new cluster.

One line per check, ``OK``, ``WARN`` or ``FAIL``, printed as each check finishes:

- versions of the stack (python, torch, transformers, trl, deepspeed, submitit, accelerate, datasets);
- GPUs and torch's CUDA build;
- DeepSpeed: whether the ops this config needs are prebuilt, already JIT-built, or would be compiled on
  first use (nothing is compiled here);
- SLURM: the client commands, the job's ``SLURM_*`` variables, the container image;
- the run directory and the traces folder: writable, and free space for the checkpoints retention keeps;
- the model directory: readable, with weights;
- the grace budget: one training step plus one full save must fit in ``slurm.signal_delay_s``, measured
  from the run's ``metrics.jsonl`` (``step_time``) and ``logs/rank0.log`` (the save lines) when it has them.

Exit status 1 when any check FAILs (something that blocks a run), else 0. Nothing is created or changed:
folders that do not exist yet are judged by their nearest existing parent.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rlarith.checkpoints import human_bytes, tree_bytes, valid_checkpoints
from rlarith.config import ConfigError, RunConfig
from rlarith.durable import writable
from rlarith.grace import SAVE_LINE, measured_times, partition_grace_s, verdict  # noqa: F401  (tests)

PACKAGES = ("torch", "transformers", "trl", "deepspeed", "submitit", "accelerate", "datasets")
KEPT_CHECKPOINTS = 5
"""Retention keeps up to four (first, second-to-last, latest, best), plus the one being written."""
BYTES_PER_PARAM = {False: 12, True: 16}
"""Checkpoint bytes per parameter, estimated before any exists: fp32 weights and Adam's two moments; a
DeepSpeed checkpoint also holds the fp32 master copy (shared/notes/gpu-baseline.md: 8.2 GB for 0.5B)."""
TRACES_MIN_FREE = 1 << 30


@dataclass(frozen=True)
class Check:
    status: str
    """``OK``, ``WARN`` or ``FAIL`` (blocks a run)."""
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status:<4} {self.name:<9} {self.detail}"


def ok(name: str, detail: str) -> Check:
    return Check("OK", name, detail)


def warn(name: str, detail: str) -> Check:
    return Check("WARN", name, detail)


def fail(name: str, detail: str) -> Check:
    return Check("FAIL", name, detail)


# ------------------------------------------------------------------------------------------ the stack


def check_versions() -> Check:
    found, missing = [f"python {platform.python_version()}"], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        return fail(
            "versions",
            f"not installed: {', '.join(missing)} (have {', '.join(found)}); "
            "install rlarith with its dependencies (pip install -c constraints.txt .)",
        )
    return ok("versions", ", ".join(found))


def check_gpus(cfg: RunConfig) -> Check:
    import torch

    build = f"torch CUDA build {torch.version.cuda}" if torch.version.cuda else "torch CPU build"
    if not torch.cuda.is_available():
        if cfg.slurm.gpus_per_node and os.environ.get("SLURM_JOB_ID"):
            return fail(
                "gpus",
                f"none visible in a job that asked for slurm.gpus_per_node="
                f"{cfg.slurm.gpus_per_node} ({build}); with apptainer, pass --nv",
            )
        return warn("gpus", f"none visible ({build}): training runs on the CPU")
    names = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        names.append(f"{i}: {p.name} {p.total_memory / 2**30:.0f} GiB")
    detail = f"{len(names)} ({'; '.join(names)}), {build}, driver {_driver_version()}"
    if cfg.model.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        return fail("gpus", f"{detail}: no bfloat16 support; set model.dtype=float16 or float32")
    return ok("gpus", detail)


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def deepspeed_ops_needed(cfg: RunConfig, on_cpu: bool) -> list[tuple[str, str]]:
    """``(op builder class, why)`` for the DeepSpeed ops this config loads. The shipped ZeRO configs let
    the HF Trainer pass torch's AdamW to DeepSpeed and offload nothing: on GPUs they need no op at all."""
    from rlarith.training.grpo_config import deepspeed_config

    path = deepspeed_config(cfg)
    if path is None:
        return []
    ds = json.loads(Path(path).read_text())
    zero = ds.get("zero_optimization", {})
    needed = [("ShareMemCommBuilder", "DeepSpeed's CPU collectives")] if on_cpu else []
    if str(zero.get("offload_optimizer", {}).get("device", "none")).lower() == "cpu":
        needed.append(("CPUAdamBuilder", "offload_optimizer to the CPU"))
    elif str(ds.get("optimizer", {}).get("type", "")).lower() in ("adam", "adamw"):
        needed.append(("FusedAdamBuilder", "its optimizer section"))
    return needed


def check_deepspeed(cfg: RunConfig | None) -> Check:
    """With a config: the ops it needs. Without one: whether DeepSpeed imports and which ops are prebuilt."""
    if cfg is not None and cfg.training.deepspeed == "none":
        return ok("deepspeed", "not used by this config (training.deepspeed=none)")
    logging.disable(logging.WARNING)  # DeepSpeed announces its accelerator choice as a warning
    try:
        import torch
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import get_default_build_root

        accelerator = get_accelerator()
    except Exception as err:  # a broken install raises anything from ImportError to RuntimeError
        return fail("deepspeed", f"does not import ({type(err).__name__}: {err}); reinstall it")
    finally:
        logging.disable(logging.NOTSET)
    device = accelerator.device_name()
    if cfg is None:
        prebuilt = sorted(name for name, built in installed_ops.items() if built)
        return ok(
            "deepspeed", f"imports, {device} accelerator; prebuilt ops: {', '.join(prebuilt) or 'none'}"
        )
    needed = deepspeed_ops_needed(cfg, on_cpu=device == "cpu")
    if not needed:
        return ok("deepspeed", f"{device} accelerator; this config needs no compiled op")
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    cache = Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{flavour}"
    missing_tools = _jit_toolchain(cuda=device != "cpu")
    parts, jit, broken = [], [], []
    for cls, why in needed:
        builder = accelerator.create_op_builder(cls)
        if builder is None:
            broken.append(f"{cls} (none for the {device} accelerator)")
        elif installed_ops.get(builder.NAME):
            parts.append(f"{builder.NAME} prebuilt")
        elif any((cache / builder.NAME).glob("*.so")):
            parts.append(f"{builder.NAME} JIT-built in {cache / builder.NAME}")
        elif missing_tools or not builder.is_compatible(verbose=False):
            broken.append(
                f"{builder.NAME} ({why}): not prebuilt, and no JIT build here ({missing_tools or 'incompatible'})"
            )
        else:
            jit.append(f"{builder.NAME} ({why})")
    if broken:
        return fail(
            "deepspeed", "; ".join(broken + parts) + "; use an image with the op prebuilt (Containerfile)"
        )
    if jit:
        return warn(
            "deepspeed",
            f"compiles on first use, once per cache ({', '.join(jit)}; minutes; "
            f"cache {cache}, set TORCH_EXTENSIONS_DIR to keep it)" + "".join(f"; {p}" for p in parts),
        )
    return ok("deepspeed", "; ".join(parts))


def _jit_toolchain(cuda: bool) -> str | None:
    """What a JIT build of a DeepSpeed op would lack here (None: nothing)."""
    from torch.utils.cpp_extension import CUDA_HOME

    lacking = [tool for tool in ("ninja", os.environ.get("CXX", "c++")) if shutil.which(tool) is None]
    if cuda and not (CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file()):
        lacking.append("nvcc")
    return f"no {', '.join(lacking)}" if lacking else None


# ------------------------------------------------------------------------------------------ the cluster


def _in_container() -> bool:
    return (
        bool(os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"))
        or Path("/.dockerenv").exists()
        or Path("/run/.containerenv").exists()  # podman
    )


def check_slurm(cfg: RunConfig) -> Check:
    tools = [t for t in ("sbatch", "srun", "scontrol") if shutil.which(t)]
    variables = sorted(k for k in os.environ if k.startswith("SLURM_"))
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        where = ", ".join(tools) or "no SLURM commands (normal inside the image: the host requeues)"
        return ok("slurm", f"in job {job} (restart {restarts}), {len(variables)} SLURM_* variables; {where}")
    used = cfg.slurm.executor == "slurm"
    if not tools:
        if used:
            return fail(
                "slurm",
                "slurm.executor=slurm but no sbatch on PATH; run `rlarith submit` on a "
                "login node, or set slurm.executor=local",
            )
        return ok("slurm", "not on this machine (not needed: slurm.executor=local)")
    up, said = _ping()
    detail = f"{', '.join(tools)} on PATH; scontrol ping: {said}"
    if up:
        return ok("slurm", detail)
    if used:
        return fail("slurm", f"{detail}; the controller must answer (is SLURM_CONF set?)")
    return ok("slurm", f"{detail} (not needed: slurm.executor=local)")


def _ping() -> tuple[bool, str]:
    """Whether ``scontrol ping`` reaches a controller, and its last line."""
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, str(err)
    lines = (out.stdout + out.stderr).strip().splitlines() or ["no output"]
    return out.returncode == 0 and "UP" in out.stdout, lines[-1].strip()


def check_container(cfg: RunConfig) -> Check:
    image = cfg.slurm.container
    if not image:
        inside = " (running inside one now)" if _in_container() else ""
        return ok("container", f"none: the trainer runs on the host{inside}")
    from rlarith import container

    podman = container.kind(cfg) == "podman"  # the image is a name in podman's storage, not a file
    if not podman and not Path(image).exists():
        return fail(
            "container",
            f"slurm.container: image {image!r} not found; build it (Containerfile, "
            "apptainer.def) or leave the key empty",
        )
    runtime = cfg.slurm.container_runtime
    found = shutil.which(runtime)
    size = "" if podman else f" ({human_bytes(_image_bytes(Path(image)))})"
    if not found:
        if not os.environ.get("SLURM_JOB_ID") and cfg.slurm.executor == "slurm":
            return warn(
                "container", f"{image}{size}; no {runtime} on this node's PATH: the compute nodes need it"
            )
        return fail("container", f"{image}{size}; slurm.container_runtime: no {runtime} on PATH; install it")
    mismatch = container.version_mismatch(cfg, dict(os.environ))
    if mismatch:
        return fail("container", mismatch)
    return ok("container", f"{image}{size}, runtime {found}; its rlarith reads this rlarith's configs")


def _image_bytes(image: Path) -> int:
    """A SIF file's size, or an unpacked image directory's (ch-run)."""
    return image.stat().st_size if image.is_file() else tree_bytes(image)


IB_SYSFS = Path("/sys/class/infiniband")
"""One entry per InfiniBand/RoCE device the kernel sees (what NCCL's IB transport would use)."""


def _ibverbs() -> tuple[str | None, list[str]]:
    """libibverbs (as NCCL dlopens it) and its device providers (ibverbs-providers), if installed."""
    import ctypes
    import glob

    try:
        ctypes.CDLL("libibverbs.so.1")
        lib: str | None = "libibverbs.so.1"
    except OSError:
        lib = None
    found = glob.glob("/usr/lib*/libibverbs/*-rdmav*.so") + glob.glob("/usr/lib*/*/libibverbs/*-rdmav*.so")
    providers = sorted({Path(p).name.split("-rdmav")[0] for p in found})
    return lib, providers


def check_ranks(cfg: RunConfig) -> Check:
    """How the job's ranks take GPUs and CPUs (rlarith.ranks): one rank per GPU, each using ``cuda:LOCAL_RANK``
    among its node's GPUs. Inside a SLURM job, also what SLURM gave this task: a GPU of its own for this
    rank, and ``slurm.cpus_per_task`` CPUs in its affinity mask."""
    from rlarith.ranks import RankEnvError, gpu_env

    s = cfg.slurm
    plan = f"{s.nodes} node(s) x {s.tasks_per_node} rank(s), " + (
        f"one GPU each (cuda:LOCAL_RANK among the node's {s.gpus_per_node})" if s.gpus_per_node else "no GPUs"
    )
    if s.gpus_per_node and s.tasks_per_node != s.gpus_per_node:
        return fail(
            "ranks",
            f"{plan}: slurm.tasks_per_node={s.tasks_per_node} must equal slurm.gpus_per_node={s.gpus_per_node} "
            "(one rank per GPU); set both to the GPUs per node",
        )
    if not os.environ.get("SLURM_JOB_ID"):
        return ok("ranks", f"{plan}, {s.cpus_per_task} CPU(s) each")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if s.gpus_per_node and visible:
        try:
            gpu_env(visible, int(os.environ.get("SLURM_LOCALID", "0")), s.tasks_per_node)
        except RankEnvError as err:
            return fail("ranks", f"{plan}: {err}")
    cpus = len(os.sched_getaffinity(0))
    if cpus < s.cpus_per_task:
        return warn(
            "ranks",
            f"{plan}: this task may run on {cpus} CPU(s), fewer than slurm.cpus_per_task={s.cpus_per_task}; "
            "start it with srun --cpus-per-task (SLURM 22.05-23.02's srun does not inherit sbatch's)",
        )
    return ok("ranks", f"{plan}; this task: CUDA_VISIBLE_DEVICES={visible or '(unset)'}, {cpus} CPU(s)")


def check_network(cfg: RunConfig) -> Check:
    """Which network NCCL will use between nodes, where this machine can tell: InfiniBand/RoCE when the
    kernel has such a device and the user-space libraries (libibverbs1, ibverbs-providers) are here; else
    TCP sockets, which NCCL falls back to without an error (many times slower)."""
    if os.environ.get("NCCL_IB_DISABLE") == "1":
        return ok("network", "NCCL between nodes: TCP sockets (NCCL_IB_DISABLE=1)")
    devices = sorted(p.name for p in IB_SYSFS.glob("*")) if IB_SYSFS.is_dir() else []
    lib, providers = _ibverbs()
    have = f"{lib} with {len(providers)} provider(s)" if lib and providers else (lib or "no libibverbs.so.1")
    if devices and lib and providers:
        return ok("network", f"NCCL between nodes: InfiniBand/RoCE ({', '.join(devices)}; {have})")
    if devices:
        return fail(
            "network",
            f"InfiniBand/RoCE devices ({', '.join(devices)}) but {have} here: NCCL would fall back to TCP "
            "sockets between nodes, silently and many times slower; install libibverbs1 and ibverbs-providers "
            "(the image has them: run in it)",
        )
    detail = f"NCCL between nodes: TCP sockets (no InfiniBand/RoCE device visible; {have})"
    if cfg.slurm.nodes > 1 and cfg.slurm.gpus_per_node:
        return warn(
            "network", detail + f"; slurm.nodes={cfg.slurm.nodes}: check the nodes have a fast fabric"
        )
    return ok("network", detail)


# ------------------------------------------------------------------------------------------ the run


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where it would be created)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _writable(path: Path) -> str | None:
    """None when a file with data can be written at ``path`` (or where it would be created), else why not:
    the probe the trainer also runs before it loads the model (rlarith.durable.writable)."""
    return writable(path)


def checkpoint_bytes(cfg: RunConfig) -> tuple[int, str]:
    """Size of one checkpoint: the run's latest, else an estimate from the model's weight files."""
    found = valid_checkpoints(cfg.run_dir)
    if found:
        return tree_bytes(found[-1][1]), f"checkpoint-{found[-1][0]}"
    model = Path(cfg.model.path)
    weights = sum(p.stat().st_size for p in _weight_files(model))
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    params = weights // (2 if dtype in ("bfloat16", "float16") else 4)
    return params * BYTES_PER_PARAM[cfg.training.deepspeed != "none"], "estimated from the model's weights"


def check_run_dir(cfg: RunConfig) -> Check:
    run_dir = cfg.run_dir
    problem = _writable(run_dir)
    if problem:
        return fail("run dir", f"{run_dir}: {problem}; choose a writable runs_dir")
    free = shutil.disk_usage(_existing(run_dir)).free
    one, how = checkpoint_bytes(cfg)
    need = one * KEPT_CHECKPOINTS
    detail = (
        f"{run_dir}: writable, {human_bytes(free)} free; a checkpoint is {human_bytes(one)} ({how}), "
        f"retention needs up to {human_bytes(need)}"
    )
    if free < one:
        return fail("run dir", detail + ": not even one fits; free space or move runs_dir")
    if free < need:
        return warn("run dir", detail)
    return ok("run dir", detail)


def check_trace_dir(cfg: RunConfig) -> Check:
    if not cfg.traces.enabled:
        return ok("traces", "disabled (traces.enabled=false)")
    trace_dir = cfg.trace_dir
    problem = _writable(trace_dir)
    if problem:
        return fail("traces", f"{trace_dir}: {problem}; set traces.dir or SCRATCH to a writable folder")
    free = shutil.disk_usage(_existing(trace_dir)).free
    detail = f"{trace_dir}: writable, {human_bytes(free)} free"
    return warn("traces", detail + " (under 1 GiB)") if free < TRACES_MIN_FREE else ok("traces", detail)


def _weight_files(model: Path) -> list[Path]:
    return [p for pattern in ("*.safetensors", "*.bin") for p in model.glob(pattern)]


def check_model(cfg: RunConfig) -> Check:
    from rlarith.training.preflight import check_model_path

    try:
        check_model_path(cfg)
    except ConfigError as err:
        return fail("model", str(err))
    model = Path(cfg.model.path)
    weights = _weight_files(model)
    if not weights:
        return fail(
            "model",
            f"model.path: {str(model)!r} has config.json but no weights (*.safetensors, "
            "*.bin); save the model with save_pretrained",
        )
    unreadable = [p.name for p in weights if not os.access(p, os.R_OK)]
    if unreadable:
        return fail(
            "model", f"model.path: cannot read {', '.join(unreadable)} in {str(model)!r}; fix permissions"
        )
    size = human_bytes(sum(p.stat().st_size for p in weights))
    return ok("model", f"{model}: readable, {len(weights)} weight file(s), {size}")


def check_grace(cfg: RunConfig) -> Check:
    delay = cfg.slurm.signal_delay_s
    step, save = measured_times(cfg.run_dir)
    if step is None or save is None:
        missing = ", ".join(
            what
            for what, v in (("no step_time in metrics.jsonl", step), ("no save line in logs/rank0.log", save))
            if v is None
        )
        return warn(
            "grace",
            f"not measured yet ({cfg.run_dir}: {missing}). Run a few steps with "
            f"checkpoints (e.g. training.max_steps=2 checkpoints.save_every=1) and run doctor again; "
            f"slurm.signal_delay_s={delay} s must cover one step and one save",
        )
    status, detail = verdict(step, save, delay, partition_grace_s(cfg.slurm.partition, cfg.slurm.qos))
    return Check(status, "grace", detail)


# ------------------------------------------------------------------------------------------ all of it


def checks(cfg: RunConfig, config_given: bool = True) -> Iterator[Check]:
    """Every check, in order; each one runs when asked for (so lines appear as they finish). Without a
    config only the machine is checked: the stack, GPUs, DeepSpeed and SLURM."""
    steps: list[Callable[[], Check]] = [
        check_versions,
        lambda: check_gpus(cfg),
        lambda: check_deepspeed(cfg if config_given else None),
        lambda: check_slurm(cfg),
        lambda: check_network(cfg),
    ]
    if config_given:
        steps += [
            lambda: check_ranks(cfg),
            lambda: check_container(cfg),
            lambda: check_run_dir(cfg),
            lambda: check_trace_dir(cfg),
            lambda: check_model(cfg),
            lambda: check_grace(cfg),
        ]
    for step in steps:
        yield step()


def doctor(cfg: RunConfig, config_given: bool = True, out: Callable[[str], None] = print) -> int:
    """Print every check; 1 when any FAILed, else 0."""
    failed = 0
    for check in checks(cfg, config_given):
        out(str(check))
        failed += check.status == "FAIL"
    if failed:
        out(f"FAIL: {failed} check(s) block a run" + (f" of {cfg.name!r}" if config_given else ""))
    elif config_given:
        out(f"OK: nothing blocks a run of {cfg.name!r}")
    else:
        out(
            "OK: this machine can run rlarith; `rlarith doctor -c CONFIG` also checks a run's model, folders "
            "and grace budget"
        )
    return 1 if failed else 0
