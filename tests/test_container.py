"""The trainer's command inside a container (rlarith.container), as the job driver builds it: what is bound,
what is created before the runtime starts, what crosses into the container's environment. The runtimes
themselves run in tests/test_image.py (podman, ch-run) and tests/test_submit.py (ch-run under SLURM)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import REPO
from rlarith import container
from rlarith.config import ConfigError, load_config
from rlarith.launch import absolute, check_submittable, trainer_command

HOST_ENV = {
    "PATH": "/usr/bin:/bin", "HOME": "/home/me", "PYTHONPATH": "/home/me/lib", "FOO": "bar",
    "RANK": "1", "MASTER_ADDR": "n1", "SLURM_JOB_ID": "42", "RLARITH_ATTEMPT": "42.0",
    "CUDA_VISIBLE_DEVICES": "0,1", "NCCL_SOCKET_IFNAME": "ib0", "OMP_NUM_THREADS": "2",
}  # fmt: skip


def config(tmp_path: Path, *extra: str):
    (tmp_path / "model").mkdir(exist_ok=True)
    return absolute(load_config(REPO / "configs" / "default.yaml", [
        f"runs_dir={tmp_path / 'runs'}", f"model.path={tmp_path / 'model'}", "slurm.container=/images/rlarith.sif",
        f"traces.dir={tmp_path / 'scratch' / 'traces'}", f"slurm.logs_dir={tmp_path / 'logs'}", *extra,
    ]))  # fmt: skip


def test_apptainer_gets_a_clean_environment_with_what_the_trainer_needs(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    argv, env = trainer_command(cfg, tmp_path / "logs" / "default" / "frozen.yaml", HOST_ENV)
    assert argv[:3] == ["apptainer", "exec", "--cleanenv"] and argv[-4:-1] == ["rlarith", "train", "-c"]
    inner = {k.removeprefix("APPTAINERENV_"): v for k, v in env.items() if k.startswith("APPTAINERENV_")}
    assert inner == {
        "RANK": "1", "MASTER_ADDR": "n1", "SLURM_JOB_ID": "42", "RLARITH_ATTEMPT": "42.0",
        "CUDA_VISIBLE_DEVICES": "0,1", "NCCL_SOCKET_IFNAME": "ib0", "OMP_NUM_THREADS": "2", "PYTHONNOUSERSITE": "1",
    }  # fmt: skip
    assert "PYTHONPATH" not in env, "a host PYTHONPATH would replace the image's packages"


def test_every_folder_the_trainer_uses_is_bound_and_created(tmp_path: Path) -> None:
    own = tmp_path / "ds" / "mine.json"
    own.parent.mkdir()
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = config(tmp_path, "training.deepspeed=ds/mine.json")  # relative: made absolute at submit
    finally:
        os.chdir(cwd)
    assert cfg.training.deepspeed == str(own)
    frozen = tmp_path / "logs" / "default" / "frozen.yaml"
    argv, _ = trainer_command(cfg, frozen, HOST_ENV)
    bound = {argv[i + 1] for i, a in enumerate(argv) if a == "--bind"}
    assert bound == {
        str(p)
        for p in (
            tmp_path / "runs",
            frozen.parent,
            tmp_path / "model",
            tmp_path / "scratch" / "traces",
            own.parent,
        )
    }
    container.create_bind_sources(cfg, frozen)
    assert all(Path(p).is_dir() for p in bound), "a runtime refuses a bind source that does not exist"


@pytest.mark.parametrize("runtime", ["ch-run", "/opt/charliecloud/bin/ch-run", "podman"])
def test_other_runtimes_take_the_image_binds_and_environment(tmp_path: Path, runtime: str) -> None:
    cfg = config(tmp_path, f"slurm.container_runtime={runtime}", "slurm.binds=[/data:/data]")
    argv, env = trainer_command(cfg, tmp_path / "frozen.yaml", HOST_ENV)
    assert argv[0] == runtime and "PYTHONPATH" not in env
    text = " ".join(argv)
    if "ch-run" in runtime:
        assert argv[1] == "--unset-env=*" and "--set-env=RANK=1" in argv and "--bind=/data:/data" in argv
        assert argv[argv.index("--") - 1] == "/images/rlarith.sif" and argv[argv.index("--") + 1] == "rlarith"
    else:
        assert (
            argv[1:3] == ["run", "--rm"]
            and "--env=PYTHONNOUSERSITE=1" in argv
            and "--volume=/data:/data" in argv
        )
        assert f"--user={os.getuid()}:{os.getgid()}" in argv and "--network=host" in argv
    assert "FOO" not in text and "/home/me/lib" not in text


def test_a_runtime_that_is_not_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="slurm.container_runtime"):
        load_config(overrides=["slurm.container_runtime=docker"])


def test_a_missing_user_bind_is_refused_before_submitting(tmp_path: Path) -> None:
    image = tmp_path / "rlarith.sif"
    image.write_text("")
    cfg = config(tmp_path, f"slurm.container={image}", f"slurm.binds=[{tmp_path / 'nope'}]")
    with pytest.raises(ConfigError, match="slurm.binds"):
        check_submittable(cfg)
