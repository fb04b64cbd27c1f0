# Two commands for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline by default on these machines (no hub lookups that retry for minutes); override with
# `make demo HF_HUB_OFFLINE=0` where the hub is reachable.
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
DEMO_ARGS ?=

.PHONY: install demo test lint

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,dask,ray]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/gridistill run $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
