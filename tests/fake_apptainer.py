#!/usr/bin/env python3
"""A stand-in for ``apptainer exec`` (no container runtime runs on the test machines): a real process
boundary that behaves as apptainer's starter does for what rlarith relies on.

- parses ``exec [--nv] [--bind PATH]... IMAGE COMMAND...`` and refuses anything else;
- runs COMMAND as its child with only the bound folders promised (it records them), and with ``scontrol``
  missing, as inside most images, so a requeue issued from inside the "container" fails;
- forwards TERM/USR2/INT to the child and exits with its status, as apptainer does.

It appends one JSON line per call to ``$FAKE_APPTAINER_LOG``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "exec":
        print(f"fake apptainer: only 'exec' is supported, got {argv[:1]}", file=sys.stderr)
        return 255
    args, binds, nv = argv[1:], [], False
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--nv":
            nv = True
        elif flag == "--bind":
            binds.append(args.pop(0))
        else:
            print(f"fake apptainer: unknown option {flag}", file=sys.stderr)
            return 255
    image, command = args[0], args[1:]
    if not Path(image).exists():
        print(f"fake apptainer: image {image} not found", file=sys.stderr)
        return 255
    if os.environ.get("FAKE_APPTAINER_LOG"):
        with open(os.environ["FAKE_APPTAINER_LOG"], "a") as fh:
            fh.write(json.dumps({"image": image, "binds": binds, "nv": nv, "command": command}) + "\n")

    # No scontrol inside the image: a stub that fails the way a missing command does.
    shadow = Path(tempfile.mkdtemp(prefix="fake-apptainer-"))
    (shadow / "scontrol").write_text("#!/bin/sh\necho 'scontrol: command not found' >&2\nexit 127\n")
    (shadow / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{shadow}:{os.environ.get('PATH', '')}", APPTAINER_CONTAINER=image)
    child = subprocess.Popen(command, env=env)
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    rc = child.wait()
    return 128 - rc if rc < 0 else rc  # like a shell: killed by signal N -> 128 + N


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
