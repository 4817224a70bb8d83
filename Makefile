# Two commands from a fresh clone: `make train` and `make test`.
# `make train` installs the core alone (`pip install -e .`: the default experiment trains on it); `make test`
# installs the dev extra (every optional library, the docs tools and the test tools) into the same .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Stamps of the two installs; tests/test_docs.py runs `make train` with the core's taken as made (make -o).
CORE := $(VENV)/.jaxmodels-installed
DEV := $(VENV)/.jaxmodels-dev
WORKDIR ?= runs/digits_cnn
ARGS ?=  # more flags for `make train`, e.g. ARGS=--config.train.steps=100

.PHONY: train test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(CORE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $(CORE)

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(DEV) $(CORE)

train: $(CORE)
	$(BIN)/jaxmodels train --config experiments/digits_cnn.py --workdir $(WORKDIR) $(ARGS)

# Three pytest workers on the 2-core development VM: many tests wait on the processes and daemons they start, and
# two workers left the cores idle then (full suite: 29:56 with -n 3 alone on the VM, 38:13 with -n 2 beside a
# light helper job; same CPU seconds).
test: $(DEV)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 3 --dist worksteal

test-fast: $(DEV)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 3 --dist worksteal -m "not slow"

clean:
	rm -rf runs .pytest_cache
