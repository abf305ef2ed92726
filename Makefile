# One target per promise: `make demo` (the main job) and `make test` (exactly what CI runs) each set up
# what they need first; `make setup` only builds the environment.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Rebuilt when the dependency lists change.
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test lint format image-test

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build on this machine's disk (constraints.txt); then the package.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: $(INSTALLED)
	$(BIN)/rlarith demo --config configs/default.yaml

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

# The image built for real and run (root, Debian 12: podman, debootstrap, charliecloud; container/testimage.sh)
# with the container tests. `make test` runs them too; this is the short loop for a change to the image.
image-test: $(INSTALLED)
	$(BIN)/python -m pytest -m image tests/test_image.py tests/test_submit.py
