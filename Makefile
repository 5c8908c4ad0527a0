# Stead task runner. `make help` lists every command.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help dev test lint typecheck unit test-drills bench bytecode lock clean mutants

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Stead needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The worker's sandbox re-imports a workflow's module for every new run: without cached bytecode
# (PYTHONDONTWRITEBYTECODE, a read-only tree) that is a compile per run. Incremental, well under 1 s.
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q activities api bench policies stead workflows worker.py

dev: $(STAMP) bytecode ## run the whole platform locally (Temporal, Postgres, simulator, worker, API)
	$(BIN)/stead dev --app worker:APP

test: $(STAMP) lint typecheck unit ## lint, type-check and run the test suite

lint: $(STAMP) ## ruff: style, imports, bugs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict
	$(BIN)/mypy .

unit: $(STAMP) ## pytest, without the slow drills
	$(BIN)/pytest -q

test-drills: $(STAMP) ## the slow reliability drills (kill -9, restarts, faults)
	$(BIN)/pytest -q -m drill

bench: $(STAMP) bytecode ## benchmarks against raw Temporal; writes bench/results/ (BENCH_ARGS="--quick latency")
	$(BIN)/python -m bench $(BENCH_ARGS)

mutants: $(STAMP) ## mutation testing of the critical modules, slow (MUTANTS="audit codec" for some)
	$(BIN)/python -m tests.mutants $(MUTANTS)

lock: ## re-pin requirements.lock from pyproject.toml
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean: ## remove the venv and local state (.stead/)
	rm -rf $(VENV) .stead .mypy_cache .ruff_cache
