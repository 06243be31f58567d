# Two commands on a fresh clone:  make demo  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-friendly defaults (docs/platform.md): one OpenMP thread per process, vLLM engine
# in-process, a small KV cache, no hub access, DeepSpeed on the CPU accelerator.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_NO_USAGE_STATS ?= 1
export HF_HUB_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test test-fast lint clean
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m protege.cli demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest -q --timeout=900 --durations=30 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .cache .pytest_cache
