"""``rlarith doctor``: a good setup passes, each thing that blocks a run FAILs with exit 1, and the grace
budget is measured from a real run's metrics and log."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import REPO, cli
from rlarith.config import load_config
from rlarith.doctor import SAVE_LINE, check_grace, deepspeed_ops_needed, doctor, measured_times

NAMES = ("versions", "gpus", "deepspeed", "slurm", "network", "ranks", "container", "run dir", "traces", "model",
         "grace")  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlarith.tinymodel import init_model

    return init_model(tmp_path_factory.mktemp("doctor") / "model", hidden=32, layers=1)


def run_doctor(*overrides: str) -> tuple[int, dict[str, str]]:
    """Doctor in this process (training.deepspeed=none: no DeepSpeed import here); status by check."""
    lines: list[str] = []
    code = doctor(load_config(REPO / "configs" / "default.yaml", list(overrides)), out=lines.append)
    statuses = {line[5:15].strip(): line[:4].strip() for line in lines[:-1]}
    return code, statuses


def test_a_good_config_passes_and_every_check_reports(model, tmp_path) -> None:
    code, statuses = run_doctor(f"model.path={model}", f"runs_dir={tmp_path / 'runs'}")
    assert tuple(statuses) == NAMES
    assert code == 0 and "FAIL" not in statuses.values(), statuses
    assert statuses["model"] == statuses["run dir"] == statuses["traces"] == "OK"
    assert statuses["grace"] == "WARN", "nothing measured in a new run"
    assert not (tmp_path / "runs").exists(), "doctor creates nothing"


def test_without_a_config_only_the_machine_is_checked() -> None:
    """What the image's %test and build run: no model or run folders exist there, and none are needed."""
    result = cli(["doctor"])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line[5:15].strip() for line in lines[:-1]] == [
        "versions",
        "gpus",
        "deepspeed",
        "slurm",
        "network",
    ]
    assert lines[2].startswith("OK   deepspeed imports") and "WARNING" not in result.stdout + result.stderr
    assert lines[-1].startswith("OK: this machine can run rlarith")


def test_a_missing_model_path_fails_with_exit_1(tmp_path) -> None:
    result = cli(
        ["doctor", "-c", "configs/default.yaml", f"model.path={tmp_path / 'nope'}", f"runs_dir={tmp_path}"]
    )
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("FAIL model")]
    assert "model.path" in line and "nope" in line and "no config.json" in line
    assert result.stdout.splitlines()[-1].startswith("FAIL: 1 check(s) block a run")


def test_a_model_without_weights_fails(model, tmp_path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model / "config.json").read_text())
    code, statuses = run_doctor(f"model.path={bare}", f"runs_dir={tmp_path / 'runs'}")
    assert code == 1 and statuses["model"] == "FAIL"


def test_an_unwritable_run_dir_fails(model, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("runs_dir cannot be created beneath a file, not even by root")
    code, statuses = run_doctor(f"model.path={model}", f"runs_dir={blocker / 'runs'}")
    assert code == 1 and statuses["run dir"] == "FAIL" and statuses["traces"] == "FAIL", statuses
    # A separate, writable trace folder: only the run dir fails.
    code, statuses = run_doctor(
        f"model.path={model}", f"runs_dir={blocker / 'runs'}", f"traces.dir={tmp_path / 'traces'}"
    )
    assert code == 1 and statuses["run dir"] == "FAIL" and statuses["traces"] == "OK"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_run_dir_fails(model, tmp_path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o500)
    try:
        code, statuses = run_doctor(f"model.path={model}", f"runs_dir={runs}")
    finally:
        runs.chmod(0o700)
    assert code == 1 and statuses["run dir"] == "FAIL"


def test_slurm_executor_without_a_reachable_cluster_fails(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch/scontrol at all
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    code, statuses = run_doctor(f"model.path={model}", f"runs_dir={tmp_path}", "slurm.executor=slurm")
    assert code == 1 and statuses["slurm"] == "FAIL"
    code, statuses = run_doctor(f"model.path={model}", f"runs_dir={tmp_path}")
    assert statuses["slurm"] == "OK", "slurm.executor=local does not need SLURM"


def test_a_missing_container_image_fails(model, tmp_path) -> None:
    code, statuses = run_doctor(
        f"model.path={model}", f"runs_dir={tmp_path}", f"slurm.container={tmp_path / 'rlarith.sif'}"
    )
    assert code == 1 and statuses["container"] == "FAIL"


def test_deepspeed_ops_each_config_needs(tmp_path) -> None:
    def needs(stage: str, on_cpu: bool) -> list[str]:
        cfg = load_config(None, [f"training.deepspeed={stage}"])
        return [name for name, _ in deepspeed_ops_needed(cfg, on_cpu=on_cpu)]

    # The shipped configs hand torch's AdamW to DeepSpeed and offload nothing: no compiled op on GPUs.
    assert needs("zero2", on_cpu=False) == needs("zero3", on_cpu=False) == []
    assert needs("zero2", on_cpu=True) == ["ShareMemCommBuilder"]
    offload = tmp_path / "offload.json"
    offload.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    )
    assert needs(str(offload), on_cpu=False) == ["CPUAdamBuilder"]
    fused = tmp_path / "fused.json"
    fused.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    assert needs(str(fused), on_cpu=False) == ["FusedAdamBuilder"]


def test_save_lines_of_both_log_formats_are_read(tmp_path) -> None:
    assert SAVE_LINE.search("... | saved runs/x/checkpoints/checkpoint-2 in 0.2 s").group(1) == "0.2"
    assert SAVE_LINE.search(
        "... | checkpoint-4 saved: step 4 is the final step (12.5 s; removed checkpoint-2)"
    )
    assert not SAVE_LINE.search("... | resuming from checkpoint-4 (saved at step 4)")
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "step_time": 0.5}\n{"step": 2, "step_ti'
    )  # cut by a kill
    assert measured_times(tmp_path) == (0.5, None)


@pytest.mark.slow
def test_grace_budget_is_measured_from_a_real_run(model, tmp_path) -> None:
    """Two real steps with DeepSpeed ZeRO-2, each saved; then the step and save times decide the verdict."""
    common = ["-c", "configs/default.yaml", "name=g", f"runs_dir={tmp_path}", f"model.path={model}",
              "training.deepspeed=zero2"]  # fmt: skip
    train = cli(["train", *common, "training.max_steps=2", "training.prompts_per_step=2",
                 "training.num_generations=2", "training.max_completion_length=4", "checkpoints.save_every=1",
                 "training.report_to=[]"], timeout=900)  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    step, save = measured_times(tmp_path / "g")
    assert step is not None and save is not None, (tmp_path / "g" / "logs" / "rank0.log").read_text()

    good = cli(["doctor", *common, "slurm.signal_delay_s=3600"])
    assert good.returncode == 0, good.stdout + good.stderr
    (grace,) = [x for x in good.stdout.splitlines() if x.startswith("OK   grace")]
    assert f"one step {step:.2f} s + one save {save:.2f} s" in grace
    (ds,) = [x for x in good.stdout.splitlines() if x[5:15].strip() == "deepspeed"]
    assert ds.startswith("OK") and "deepspeed_shm_comm" in ds, "the op this run just JIT-built is found"

    tight = check_grace(
        load_config(REPO / "configs" / "default.yaml", [*common[2:], "slurm.signal_delay_s=0"])
    )
    assert tight.status == "FAIL" and "raise slurm.signal_delay_s" in tight.detail


def test_network_says_when_nccl_would_fall_back_to_sockets(tmp_path: Path, monkeypatch) -> None:
    """InfiniBand devices without the user-space libraries: NCCL would use TCP sockets, silently."""
    from rlarith import doctor as doc

    cfg = load_config(REPO / "configs" / "default.yaml")
    (tmp_path / "mlx5_0").mkdir()
    monkeypatch.setattr(doc, "IB_SYSFS", tmp_path)
    monkeypatch.setattr(doc, "_ibverbs", lambda: (None, []))
    check = doc.check_network(cfg)
    assert (
        check.status == "FAIL"
        and "mlx5_0" in check.detail
        and "libibverbs1 and ibverbs-providers" in check.detail
    )
    monkeypatch.setattr(doc, "_ibverbs", lambda: ("libibverbs.so.1", ["mlx5"]))
    assert doc.check_network(cfg).detail.startswith("NCCL between nodes: InfiniBand/RoCE (mlx5_0")
    monkeypatch.setattr(doc, "IB_SYSFS", tmp_path / "none")
    assert "TCP sockets" in doc.check_network(cfg).detail
