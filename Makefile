# rg-batch developer entry points. Every target creates or reuses .venv.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist, one test file per process at a time: a file's tests share its
# Ray cluster). 2 (the default) finished the suite in 47 instead of 89 minutes on a 2-core
# machine; 0 runs every test in this process (docs/testing.md).
TEST_WORKERS ?= 2
XDIST  := -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup browser test test-fast lint format bench run-local clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

# Debian's chromium: the report page is opened in a headless browser by the tests.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Benchmarks (CPU figures in the README); GPU: $(PY) -m benchmarks.gpu_engine on a GPU machine.
bench: setup
	@mkdir -p out/bench
	$(PY) -m benchmarks.prefill --json out/bench/prefill.json
	$(PY) -m benchmarks.engine_vs_reference --json out/bench/engine.json
	$(PY) -m benchmarks.engine_host --json out/bench/engine_host.json
	$(PY) -m benchmarks.controls --json out/bench/controls.json
	$(PY) -m benchmarks.pipeline_efficiency --json out/bench/pipeline.json
	$(PY) -m benchmarks.pipeline_efficiency --compile-cache cold --json out/bench/pipeline_cold.json
	$(PY) -m benchmarks.pipeline_scale --json out/bench/pipeline_scale.json
	$(PY) -m benchmarks.prefix_reuse --json out/bench/prefix_reuse.json
	$(PY) -m benchmarks.grammar --json out/bench/grammar.json
	$(PY) -m benchmarks.grammar_libraries --json out/bench/grammar_libraries.json
	$(PY) -m benchmarks.fault_soak --json out/bench/fault_soak.json
	$(PY) -m benchmarks.estimate_accuracy --json out/bench/estimate.json

FIXTURES ?= .fixtures

$(FIXTURES)/.built: | setup
	$(PY) -m pipeline.cli fixtures $(FIXTURES)
	@touch $@

# The main job on the embedded default: tiny offline model, committed sample corpus, local Ray.
run-local: setup $(FIXTURES)/.built
	$(PY) -m pipeline.cli run configs/local.yaml $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
