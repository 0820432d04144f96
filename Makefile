# make demo: set up .venv and run the demo job (local Ray, shipped tiny model, local files)
# make test: set up .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU-only machines take the CPU torch wheel first, so the open range in pyproject.toml
# installs nothing more; machines with an NVIDIA GPU get the CUDA build from the range.
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo test bench clean
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then :; else $(BIN)/pip install -q "$(TORCH_CPU)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/illada-batch demo

test: venv
	$(BIN)/python -m pytest -q -x --durations=10

bench: venv
	$(BIN)/illada-batch bench

clean:
	rm -rf $(VENV) out/ .pytest_cache
