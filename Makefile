# Everything runs from a virtual environment in .venv, made on first use.
# torch 2.14.1 / torchvision 0.29.1 are pinned: on this kind of machine pip takes them from local disk.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all test-cuda bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/qwen2vl demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow and not cuda"

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not cuda"

# On a machine with a CUDA GPU: fails, rather than skips, where torch sees none
test-cuda: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m cuda tests/test_cuda.py

bench: $(BIN)/.installed
	$(BIN)/python bench/preprocess_speed.py
	$(BIN)/python bench/linear_speed.py
	$(BIN)/python bench/model_speed.py
