# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned separately so a CPU-only machine takes the local CPU wheel instead of a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
CONFIG ?= configs/quickstart.yaml

.PHONY: run test test-reliability lint bench clean install gpu-check

install: $(VENV)/.installed

# Reinstall only when pyproject.toml changes (the stamp is older than it).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

run: install
	$(VENV)/bin/ift run $(CONFIG)

# The suite CI runs (under 30 minutes on 2 cores): everything but the tests marked `slow`.
# It lists its 30 slowest tests, so the CI log shows where the time goes.
test: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" --durations=30 $(PYTEST_ARGS) tests

# The long fault-injection and load tests (tests marked `slow`, most in tests/reliability/).
test-reliability: install
	$(PY) -m pytest -q -p no:cacheprovider -m slow $(PYTEST_ARGS) tests

lint: install
	$(VENV)/bin/ruff check launcher training data_pipeline eval tests benchmarks
	$(VENV)/bin/ruff format --check launcher training data_pipeline eval tests benchmarks
	$(VENV)/bin/mypy

# gpu.py needs a CUDA device: `make gpu-check` runs it.
BENCHMARKS := $(filter-out benchmarks/table.py benchmarks/gpu.py,$(wildcard benchmarks/[!_]*.py))

bench: install
	$(PY) -m pip install -q -e ".[dev,bench]" "$(TORCH_SPEC)"
	@# As modules from the repo root: run as files, benchmarks/eval.py would hide the eval package.
	@set -e; for f in $(BENCHMARKS); do echo "== $$f"; $(PY) -m benchmarks.$$(basename $$f .py); done
	$(PY) -m benchmarks.table

# The GPU check, on a machine with one CUDA device and its own torch/transformers/peft (no venv,
# no network). Installs nothing from anywhere: DeepSpeed, pydantic and hjson, when they do not
# import, come from the wheels `benchmarks/gpu_bundle.sh` built where pip works (carried along),
# unpacked into a local folder. Writes benchmarks/results/gpu.json.
GPU_PYTHON ?= python3
GPU_WHEELS ?= build/gpu-wheels
GPU_SITE ?= build/gpu-site
gpu-check:
	@if ! $(GPU_PYTHON) -c "import deepspeed, pydantic, hjson" 2>/dev/null; then \
	  test -d $(GPU_WHEELS) || { echo "no $(GPU_WHEELS): run benchmarks/gpu_bundle.sh where pip works, and carry it"; exit 1; }; \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; \
	fi
	PYTHONPATH=$(CURDIR)/$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu

clean:
	rm -rf runs mlflow.db mlartifacts .pytest_cache
