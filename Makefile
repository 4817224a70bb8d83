# Two commands from a fresh clone: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.jaxmodels-installed
WORKDIR ?= runs/digits_cnn
ARGS ?=  # more flags for `make train`, e.g. ARGS=--config.train.steps=100

.PHONY: train test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/jaxmodels train --config experiments/digits_cnn.py --workdir $(WORKDIR) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

clean:
	rm -rf runs .pytest_cache
