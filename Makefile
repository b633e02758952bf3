# mergesearch: `make demo` runs the main job on generated models, `make test` runs the suite.
# Both create .venv on first use: torch==2.13.0 (the CPU wheel) goes in first when no
# torch is importable, so the package's `torch>=2.1` never pulls CUDA wheels.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python scripts/demo.py

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python scripts/bench_merge.py

clean:
	rm -rf results/* .pytest_cache
