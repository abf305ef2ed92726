"""``python -m rlarith.train``: the same as ``python -m rlarith.cli train`` (torchrun command lines written
before the training code moved to ``rlarith.training``; rlarith.training.run states the algorithm).

Not a library module: it imports nothing, and argv stays rlarith.cli's alone; it runs the command line
as a program.
"""

import runpy
import sys

if __name__ == "__main__":
    sys.argv[1:1] = ["train"]
    runpy.run_module("rlarith.cli", run_name="__main__", alter_sys=True)
