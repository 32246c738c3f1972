# The two commands: `make run` and `make test`. Everything else is what they need.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CONFIG ?= config/fieldgate.toml

.PHONY: run test lint services venv bench clean

run: services venv
	$(BIN)/fieldgate db upgrade --config $(CONFIG)
	exec $(BIN)/fieldgate run --config $(CONFIG) --no-upgrade

test: venv
	scripts/services.sh --test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

services:
	scripts/services.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	scripts/services.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

bench: venv
	$(BIN)/python -m benchmarks.drain

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
