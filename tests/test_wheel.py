"""rlarith as a user installs it: a built wheel (not the editable checkout) trains with DeepSpeed.

What an installed package reads at run time must ship inside it (``training.deepspeed: zero2`` reads
rlarith/deepspeed/zero2.json). The wheel is built offline from a copy of the sources, installed into a
fresh venv whose heavy dependencies come from .venv by a ``.pth`` line (no download), and run from a
folder outside the repository, so nothing can be found beside the source tree by accident.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, rlarith_env
from rlarith.checkpoints import valid_checkpoints
from rlarith.config import ConfigError, load_config
from rlarith.training.grpo_config import deepspeed_config


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel`` of a copy of the sources (a build in the checkout would leave build/ behind)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "rlarith", src / "rlarith", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (found,) = dist.glob("rlarith-*.whl")
    return found


def test_the_wheel_carries_what_rlarith_reads_at_run_time(wheel) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {"rlarith/deepspeed/zero2.json", "rlarith/deepspeed/zero3.json", "rlarith/cli.py"} <= set(names)
    assert not any(n.startswith(("tests/", "configs/", "benchmarks/")) for n in names)


def test_named_deepspeed_stages_resolve_inside_the_package() -> None:
    for stage in ("zero2", "zero3"):
        path = Path(deepspeed_config(load_config(None, [f"training.deepspeed={stage}"])))
        assert path.is_file() and path.parent == REPO / "rlarith" / "deepspeed"
    assert deepspeed_config(load_config(None, [])) is None


def test_a_deepspeed_file_that_is_not_json_is_a_config_error(tmp_path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ConfigError, match=r"training.deepspeed: .*ds.json' is not a readable JSON file"):
        load_config(None, [f"training.deepspeed={bad}"])


@pytest.mark.slow
def test_installed_wheel_trains_with_deepspeed_zero2_outside_the_repo(wheel, tmp_path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # torch, trl, deepspeed... from .venv, after the venv's own site-packages (where rlarith goes). A plain
    # path line: .venv's own .pth files (the editable rlarith's finder among them) are not run.
    (Path(site) / "heavy-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    work = tmp_path / "work"
    work.mkdir()
    env = rlarith_env(DS_ACCELERATOR="cpu")
    env.pop("PYTHONPATH", None)
    where = subprocess.run(
        [py, "-c", "import rlarith, rlarith.train as t; print(t.__file__); print(list(rlarith.__path__))"],
        cwd=work, env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert where.startswith(site) and str(REPO) not in where, where

    rlarith = str(venv / "bin" / "rlarith")
    subprocess.run([rlarith, "init-model", "--out", "model"], cwd=work, env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    train = subprocess.run(
        [rlarith, "train", "name=wheel", "runs_dir=runs", "model.path=model", "training.deepspeed=zero2",
         "training.max_steps=2", "training.prompts_per_step=2", "training.num_generations=2",
         "training.max_completion_length=4", "checkpoints.save_every=2", "training.report_to=[]"],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    step, checkpoint = valid_checkpoints(work / "runs" / "wheel")[-1]
    assert step == 2 and any(checkpoint.glob("global_step2")), "a sealed checkpoint with DeepSpeed shards"
