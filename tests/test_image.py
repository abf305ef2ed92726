"""The image's recipes, checked without a container runtime (none runs on CI machines): hadolint on the
Containerfile at error level, apptainer.def parsed into its sections, and the versions the image installs
(constraints.txt) equal to the ones these tests run with."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from conftest import REPO

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
    assert "-c /tmp/constraints.txt /wheels/*.whl" in text, "the wheel, at the pinned versions"
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
    assert set(body) == {"labels", "post", "environment", "runscript", "test"}
    assert body["test"] == "rlarith doctor"
    assert body["runscript"] == 'exec rlarith "$@"'
    assert f"org.opencontainers.image.version {PROJECT['version']}" in body["labels"]
    assert (
        "/etc/rlarith-git-commit" in body["post"] and "/etc/rlarith-git-commit" in CONTAINERFILE.read_text()
    )
    assert f"rlarith:{PROJECT['version']}" in DEFINITION.read_text(), "the build commands name the same tag"


def test_spython_parses_the_apptainer_definition() -> None:
    """An independent parser (spython, singularity-python) reads the same recipe."""
    from spython.main.parse.parsers import SingularityParser

    (recipe,) = SingularityParser(str(DEFINITION)).recipe.values()
    assert recipe.fromHeader == f"rlarith-{PROJECT['version']}.tar"
    assert f"org.opencontainers.image.version {PROJECT['version']}" in recipe.labels
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
