# The two commands: `make run` and `make test`. Everything else is what they need.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CONFIG ?= config/fieldgate.toml
# pytest-xdist workers for `make test`: more than the two cores CI has, because a test
# spends much of its time waiting on a daemon, a broker or a database (docs/testing.md).
TEST_WORKERS ?= 3

.PHONY: run test lint services venv bench mutation clean

run: services venv
	$(BIN)/fieldgate db upgrade --config $(CONFIG)
	exec $(BIN)/fieldgate run --config $(CONFIG) --no-upgrade

test: venv
	scripts/services.sh --test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

services:
	scripts/services.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	scripts/services.sh --packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

bench: venv
	$(BIN)/python -m benchmarks.drain

# Opt-in: mutation testing of the pure modules with their fast tests (docs/testing.md).
mutation: venv
	$(BIN)/pip install -q -e '.[dev,mutation]'
	rm -rf mutants
	$(BIN)/mutmut run
	$(BIN)/mutmut export-cicd-stats
	$(BIN)/mutmut results
	$(BIN)/python scripts/mutation_score.py

# fieldgate's own broker, if `make run` started one, stops first: its files are under var/.
clean:
	scripts/broker.sh stop
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache mutants
