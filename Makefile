# One command to run Swarmgate, one to test it. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install up test lint format bench constraints clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c requirements/constraints.txt -e '.[llama,dev]'
	touch $(STAMP)

install: $(STAMP)

## make up: gateway on SQLite plus one local device with the bundled model
up: install
	$(BIN)/swarmgate up

## make test: lint, then the whole test suite (PostgreSQL/Redis tests need those services)
test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: install
	$(BIN)/python benchmarks/gateway_overhead.py

constraints: install
	{ echo "# Exact versions of everything the project installs (direct and transitive)."; \
	  echo "# Regenerate with: make constraints"; \
	  $(BIN)/pip freeze | grep -v -E '^(-e|swarmgate)'; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
