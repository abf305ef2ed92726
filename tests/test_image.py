"""The image: its recipes checked without a runtime (hadolint on the Containerfile at error level,
apptainer.def parsed into its sections, the versions the image installs equal to the ones these tests run
with), then the image built for real and run (podman, ch-run; the fixture ``image``, tests/image_build.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from conftest import REPO, wait_for

CONTAINERFILE = REPO / "Containerfile"
DEFINITION = REPO / "apptainer.def"
HADOLINT = Path(sys.executable).parent / "hadolint"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HADOLINT), "--failure-threshold", "error", "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def pins() -> dict[str, str]:
    """constraints.txt as ``{canonical name: version}``."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            out[canonicalize_name(name)] = version
    return out


# ---------------------------------------------------------------------------------------------- Containerfile


def test_containerfile_passes_hadolint_at_error_level() -> None:
    result = hadolint(CONTAINERFILE)
    assert result.returncode == 0, json.dumps(json.loads(result.stdout or "[]"), indent=1) + result.stderr


def test_hadolint_does_fail_a_broken_containerfile(tmp_path) -> None:
    broken = tmp_path / "Containerfile"
    broken.write_text(CONTAINERFILE.read_text().replace("WORKDIR /work", "WORKDIR work"))  # DL3000, an error
    result = hadolint(broken)
    assert result.returncode != 0 and "DL3000" in result.stdout


def test_containerfile_pins_the_base_and_matches_the_project() -> None:
    text = CONTAINERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    tag, _, digest = base.partition("@")
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", tag), tag
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), "the base is pinned by digest, not only by tag"
    torch = re.search(r"pytorch:([\d.]+)-", tag).group(1)
    assert pins()["torch"] == torch, "the base image's torch is the torch the tests run with"
    assert f'org.opencontainers.image.version="{PROJECT["version"]}"' in text
    assert re.search(r"^USER 1000:1000$", text, re.M), "runs as a non-root user"
    assert re.search(r'^ENTRYPOINT \["rlarith"\]$', text, re.M)
    assert re.search(r'^VOLUME \["/cache", "/scratch"\]$', text, re.M)
    assert "-c /usr/local/share/rlarith/constraints.txt" in text, "the dependencies at the pinned versions"
    assert "libibverbs1 ibverbs-providers" in text, "NCCL's InfiniBand transport needs them"
    assert "pip install -e" not in text and not re.search(r"(?i)(token|password|secret)\s*=", text)


def test_dockerignore_lets_in_exactly_what_the_containerfile_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = set()
    for line in CONTAINERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied |= {src.rstrip("/") for src in line.split()[1:-1]}
    assert copied and copied <= allowed, copied - allowed
    assert all((REPO / path).exists() for path in copied)
    assert "*" in (REPO / ".dockerignore").read_text().splitlines(), "everything else stays out"


# ---------------------------------------------------------------------------------------------- apptainer.def


def sections(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The header (``Bootstrap``, ``From``) and the body of each ``%section``, as Apptainer splits them."""
    header: dict[str, str] = {}
    body: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("%"):
            current = line[1:].split()[0]
            body[current] = []
        elif current is not None:
            body[current].append(line)
        elif re.match(r"^\w+:", line):
            key, _, value = line.partition(":")
            header[key] = value.strip()
    return header, {name: "\n".join(lines).strip() for name, lines in body.items()}


def test_apptainer_definition_has_its_sections_and_tests_with_doctor() -> None:
    header, body = sections(DEFINITION)
    assert header == {"Bootstrap": "docker-archive", "From": f"rlarith-{PROJECT['version']}.tar"}
    # No %labels (the OCI labels come with the image: a duplicate warns at every build and may drift) and
    # no %post (a label added there needs fakeroot to build unprivileged).
    assert set(body) == {"environment", "runscript", "test"}
    assert body["test"] == "rlarith doctor"
    assert body["runscript"] == 'exec rlarith "$@"'
    assert f"rlarith:{PROJECT['version']}" in DEFINITION.read_text(), "the build commands name the same tag"
    assert "org.opencontainers.image.revision" in CONTAINERFILE.read_text()


def environment(**env: str) -> dict[str, str]:
    """What the definition's %environment leaves set, run by sh with ``env`` (/cache not writable here)."""
    _, body = sections(DEFINITION)
    script = (
        body["environment"] + '\necho "HF_HOME=$HF_HOME"; echo "TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR"'
    )
    out = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, env={"HOME": "/home/me", **env}
    )
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


def test_apptainer_environment_moves_the_image_caches_but_keeps_a_users_own() -> None:
    assert not os.access("/cache", os.W_OK)
    image_defaults = {"HF_HOME": "/cache/huggingface", "TORCH_EXTENSIONS_DIR": "/cache/torch_extensions"}
    assert environment(**image_defaults) == {
        "HF_HOME": "/home/me/.cache/huggingface",
        "TORCH_EXTENSIONS_DIR": "/home/me/.cache/torch_extensions",
    }
    mine = environment(**{**image_defaults, "HF_HOME": "/lustre/me/hf"})
    assert mine["HF_HOME"] == "/lustre/me/hf", "a user's own HF_HOME is kept"


def test_spython_parses_the_apptainer_definition() -> None:
    """An independent parser (spython, singularity-python) reads the same recipe."""
    from spython.main.parse.parsers import SingularityParser

    (recipe,) = SingularityParser(str(DEFINITION)).recipe.values()
    assert recipe.fromHeader == f"rlarith-{PROJECT['version']}.tar"
    assert recipe.cmd == 'exec rlarith "$@"'
    assert any("rlarith doctor" in line for line in recipe.install), "spython moves %test into a script"


# ---------------------------------------------------------------------------------------------- versions


def test_constraints_pin_every_dependency_within_the_project_ranges() -> None:
    pinned = pins()
    for spec in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pinned, f"constraints.txt has no pin for {req.name}"
        assert req.specifier.contains(pinned[name]), f"{req.name}=={pinned[name]} is outside {req.specifier}"


def test_the_tests_run_with_the_pinned_versions() -> None:
    """What README numbers and the image claim (constraints.txt) is what this environment has."""
    drift = []
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a pin for a platform or extra that is not installed here
        if not SpecifierSet(f"=={version}").contains(
            installed, prereleases=True
        ):  # 2.13.0 matches 2.13.0+cpu
            drift.append(f"{name} {installed} (pinned {version})")
    assert not drift, "installed versions differ from constraints.txt; run `make setup`: " + ", ".join(drift)


# ---------------------------------------------------------------------------------------------- built and run
# The image built for real (tests/image_build.py: podman, a debootstrap stand-in for the pytorch base) and
# run as a user would: podman as uid 1000 on a bound scratch, stopped and restarted in place; ch-run
# (apptainer's model: read-only image, the host user, binds) as a non-root host user.

IMAGE_STEPS = 16


def scratch_for(tmp_path: Path, sft_model: Path, owner: int | str) -> Path:
    """A scratch folder for the container, owned by ``owner``, with the config and a copy of the model
    (transformers writes model.safetensors mode 0600: only its owner reads it)."""
    scratch = tmp_path / "scratch"
    shutil.copytree(sft_model, scratch / "model")
    shutil.copy(REPO / "configs" / "default.yaml", scratch / "default.yaml")
    subprocess.run(["chown", "-R", f"{owner}:{owner}" if isinstance(owner, int) else owner, str(scratch)],
                   check=True)  # fmt: skip
    return scratch


def train_args(name: str, steps: int = IMAGE_STEPS) -> list[str]:
    """``rlarith train`` inside the container, everything on /scratch."""
    return [
        "train", "-c", "/scratch/default.yaml", f"name={name}", "runs_dir=/scratch/runs",
        "model.path=/scratch/model", f"training.max_steps={steps}", "training.prompts_per_step=4",
        "training.num_generations=4", "training.max_completion_length=5", "training.learning_rate=1e-3",
        "rewards.weights.partial=1", "rewards.weights.format=0.5", "checkpoints.save_every=2",
        "checkpoints.reward_threshold=2.0", "checkpoints.save_on_best=false", "training.report_to=[]",
    ]  # fmt: skip


def podman_run(image, scratch: Path, *args: str, detach: str = "") -> list[str]:
    """``podman run`` of the image as its own user (uid 1000), /scratch bound, one thread (as the tests)."""
    start = ["run", "--detach", f"--name={detach}"] if detach else ["run", "--rm"]
    return [
        *start,
        "--network=none",
        "-e",
        "OMP_NUM_THREADS=1",
        "-v",
        f"{scratch}:/scratch",
        image.name,
        *args,
    ]


def logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line).get("step", 0) for line in lines if '"loss"' in line), default=0)


@pytest.mark.image
def test_image_answers_help_and_doctor(image) -> None:
    helped = image.podman("run", "--rm", image.name, timeout=120)  # CMD ["--help"]
    assert helped.returncode == 0 and "train" in helped.stdout, helped.stdout + helped.stderr
    doctor = image.podman("run", "--rm", image.name, "doctor", timeout=300)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "OK: this machine can run rlarith" in doctor.stdout
    # NCCL's InfiniBand transport needs libibverbs and its providers in the image (ibverbs-providers).
    network = re.search(r"^OK\s+network\s.*(sockets|InfiniBand).*", doctor.stdout, re.M)
    assert network and "libibverbs.so.1 with" in network.group(0), doctor.stdout
    user = image.podman("run", "--rm", "--entrypoint=id", image.name, timeout=60)
    assert user.stdout.startswith("uid=1000(rlarith) gid=1000(rlarith)"), (
        user.stdout
    )  # the base's uid 1000, renamed
    version = image.podman("run", "--rm", image.name, "version", timeout=60).stdout.strip()
    host = subprocess.run([sys.executable, "-m", "rlarith.cli", "version"], capture_output=True, text=True)
    assert version == host.stdout.strip(), "the image was built from this checkout"


@pytest.mark.image
def test_a_root_owned_bind_gets_a_clear_message_not_a_traceback(image, tmp_path: Path) -> None:
    (tmp_path / "root-owned").mkdir()
    out = image.podman("run", "--rm", "--network=none", "-v", f"{tmp_path / 'root-owned'}:/scratch", image.name,
                       "init-model", "--out", "/scratch/model", timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "permission denied: /scratch/model" in out.stderr, out.stderr
    assert "uid 1000" in out.stderr and "--userns=keep-id:uid=1000,gid=1000" in out.stderr


@pytest.mark.image
@pytest.mark.slow
def test_trains_as_uid_1000_stops_on_usr2_and_resumes_in_the_restarted_container(image, sft_model: Path, tmp_path: Path) -> None:  # fmt: skip
    from test_train import assert_same_weights, metrics

    import rlarith.traces
    from rlarith.checkpoints import valid_checkpoints

    scratch = scratch_for(tmp_path, sft_model, 1000)
    runs = scratch / "runs"
    ref = image.podman(*podman_run(image, scratch, *train_args("ref")), timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    assert (runs / "ref").stat().st_uid == 1000, "written as the image's user"

    # One container, stopped twice with USR2 (exit 75) and started again in place: the same hostname and
    # pid every time, so only a unique attempt id tells its traces apart.
    name = f"rlarith-test-{tmp_path.name}"
    image.podman(*podman_run(image, scratch, *train_args("box"), detach=name), check=True)
    try:
        exits, last = [], 0
        for _ in range(2):
            wait_for(lambda last=last: logged(runs / "box") >= last + 2, timeout=300)
            image.podman("kill", "--signal=USR2", name, check=True)
            exits.append(image.podman("wait", name, timeout=300, check=True).stdout.strip())
            last = valid_checkpoints(runs / "box")[-1][0]
            assert last < IMAGE_STEPS, "stopped before the end"
            image.podman("start", name, check=True)
        assert image.podman("wait", name, timeout=600, check=True).stdout.strip() == "0"
        log = image.podman("logs", name).stderr
    finally:
        image.podman("rm", "-f", name)
    assert exits == ["75", "75"], log[-3000:]
    assert metrics(runs / "box") == metrics(runs / "ref")
    assert_same_weights(valid_checkpoints(runs / "box")[-1][1], valid_checkpoints(runs / "ref")[-1][1])

    frame = rlarith.traces.open(runs / "box").frame()
    assert sorted(frame["step"].unique()) == list(range(1, IMAGE_STEPS + 1))
    assert (frame.groupby("step").size() == 16).all()  # each step once
    assert frame["attempt"].nunique() == 3, "three starts, three attempts"
    summary = image.podman(*podman_run(image, scratch, "traces", "summary", "/scratch/runs/box"), timeout=300)
    assert summary.returncode == 0, summary.stdout + summary.stderr
    assert f"steps: {IMAGE_STEPS}  samples: {IMAGE_STEPS * 16}" in summary.stdout, summary.stdout


@pytest.mark.image
@pytest.mark.slow
def test_ch_run_trains_in_the_read_only_image_as_a_host_user(image, sft_model: Path, request) -> None:
    home = Path(tempfile.mkdtemp(prefix="rlarith-ch-"))  # pytest's own folders are root's alone (0700)
    home.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    scratch = scratch_for(home, sft_model, image.ch_user)
    uid = int(subprocess.run(["id", "-u", image.ch_user], capture_output=True, text=True).stdout)
    bind = ["--unset-env=*", "--set-env", "--set-env=OMP_NUM_THREADS=1", f"--bind={scratch}:/scratch"]
    who = image.ch_run(bind, ["sh", "-c", "id -u; touch /usr/x 2>&1; echo rc=$?"])
    assert who.stdout.splitlines()[0] == str(uid), who.stdout + who.stderr  # the host user
    assert "Read-only file system" in who.stdout and "rc=1" in who.stdout  # the image cannot change
    out = image.ch_run(bind, ["rlarith", *train_args("ch", steps=4)], timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert logged(scratch / "runs" / "ch") == 4 and (scratch / "runs" / "ch").stat().st_uid == uid


@pytest.mark.image
def test_an_image_whose_rlarith_reads_configs_otherwise_is_named_before_training(image, monkeypatch) -> None:
    """The host's rlarith writes the frozen config, the image's parses it strictly: the job driver asks the
    image first (``rlarith version`` through the runtime) and fails once, saying what to rebuild."""
    from rlarith import container
    from rlarith.config import load_config

    cfg = load_config(overrides=[f"slurm.container={image.ch_dir}", "slurm.container_runtime=ch-run"])
    env = {k: v for k, v in os.environ.items() if k != "USER"}
    assert container.version_mismatch(cfg, env) is None
    monkeypatch.setattr(container, "schema_id", lambda: "0123456789")  # as if the host's rlarith were newer
    said = container.version_mismatch(cfg, env)
    assert said and "config schema 0123456789" in said and "Rebuild the image" in said, said
