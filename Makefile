# rg-batch developer entry points. Every target creates or reuses .venv.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint format bench run-local clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup
	$(PY) benchmarks/prefill.py

FIXTURES ?= .fixtures

$(FIXTURES)/tokenizer.model: | setup
	$(PY) -m pipeline.cli fixtures $(FIXTURES)

run-local: setup $(FIXTURES)/tokenizer.model
	$(PY) -m pipeline.cli generate --checkpoint $(FIXTURES)/tiny-it --max-new-tokens 24 \
	  "Summarize: the river rose overnight and the bridge was closed." \
	  "What is the capital of France?"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
