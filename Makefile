# `make demo` and `make test` each bootstrap .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tpqueue-installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first (it lies on this machine's disk), then the project with the worker's extra.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tpq model fetch
	$(BIN)/tpq demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/engine.py

clean-venv:
	rm -rf $(VENV)
