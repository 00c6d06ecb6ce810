# cellfoundry: `make demo` (install, then run the whole pipeline end to end) and `make test`.
# Each target creates/reuses the virtualenv in .venv and installs torch==2.13.0 first, so
# nothing that depends on torch can pull another (CUDA) build. On a CPU machine outside
# this environment, pass TORCH_INDEX=https://download.pytorch.org/whl/cpu.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# DeepSpeed builds no C++/CUDA ops at install time (they are JIT-built only if used).
export DS_BUILD_OPS := 0

.PHONY: install test test-all demo bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The suite every change passes (CI runs it): unit tests and every stage's integration
# tests on real Ray. `make test-all` adds the `slow` end-to-end checks (the notebooks run,
# the 3-node corpus from local files, ZeRO-1): run it before a release.
test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=30 -m "not slow"

test-all: install
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=30

# Every stage's smoke config in order on one local Ray cluster (generated data when
# ../shared/data is missing), Serve queried over HTTP, then a summary of every artifact.
demo: install
	$(PY) -m cellfoundry.cli demo

# The CPU benchmarks; the GPU ones (bench/pretrain.py, perturb.py, finetune.py and serve.py
# with gf-104m) run on a GPU machine: see bench/README.md.
bench: install
	$(PY) bench/corpus.py
	$(PY) bench/serve.py

lint: install
	$(VENV)/bin/ruff check platform tests bench jobs
	$(VENV)/bin/ruff format --check platform tests bench jobs

clean:
	rm -rf artifacts .pytest_cache
