"""pytest plugin: rlarith's image, built for real from the Containerfile (``container/testimage.sh build``).

The fixture ``image`` builds it once per session (podman's layer cache and the cached stand-in base make a
rebuild take seconds) and gives the tests podman, the image unpacked for ``ch-run`` and a non-root host
user to run it as. It needs root (apt-get, rootful podman): elsewhere the tests skip, except under
``CI=true``, where that is a failure. Builds from several pytest sessions are serialised by a lock.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "container" / "testimage.sh"


@dataclass(frozen=True)
class Image:
    name: str
    """The podman image (``localhost/rlarith:test``)."""
    ch_dir: Path
    """The same image unpacked into a folder, for ``ch-run``."""
    ch_user: str
    """A non-root host user for ``ch-run``."""
    env: dict[str, str]
    """The environment podman needs (``CONTAINERS_CONF``)."""

    def podman(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        out = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
            )
        return out

    def ch_run(
        self, ch_args: list[str], command: list[str], timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """``ch-run CH_ARGS IMAGE -- COMMAND`` as the non-root host user."""
        return subprocess.run(
            ["runuser", "-u", self.ch_user, "--", "env", f"USER={self.ch_user}", "ch-run", *ch_args,
             str(self.ch_dir), "--", *command],
            capture_output=True, text=True, timeout=timeout, cwd="/",
        )  # fmt: skip


def build_image() -> Image:
    env = {**os.environ}
    lock = open("/var/tmp/rlarith-image.lock", "w")  # noqa: SIM115  (held until the build is done)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = subprocess.run([str(SCRIPT), "build"], capture_output=True, text=True, timeout=3600)
    finally:
        lock.close()
    if out.returncode != 0:
        raise RuntimeError(
            f"container/testimage.sh build failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    exported = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout
    for line in exported.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return Image(env["RLARITH_IMAGE"], Path(env["RLARITH_CH_IMAGE"]), env["RLARITH_CH_USER"], env)


@pytest.fixture(scope="session")
def image() -> Iterator[Image]:
    ci = os.environ.get("CI", "").lower() == "true"
    try:
        if os.geteuid() != 0:
            raise RuntimeError("the image tests need root (apt-get, rootful podman)")
        built = build_image()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        if ci:
            pytest.fail(f"CI=true and the image did not build:\n{err}", pytrace=False)
        pytest.skip(f"no image: {err}")
    yield built
