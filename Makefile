# Everything runs from a virtual environment in .venv, made on first use: `make demo` installs the library alone
# (inference), `make test` adds the extras and the test references. torch 2.14.1 / torchvision 0.29.1 are pinned
# here, not in the package: on this kind of machine pip takes them from local disk.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check
TORCH := torch==2.14.1

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-all test-cuda bench shell browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN)/.demo: pyproject.toml | $(BIN)/python
	$(PIP) -e . $(TORCH)
	touch $@

$(BIN)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[test]' $(TORCH) torchvision==0.29.1
	touch $@

demo: $(BIN)/.demo
	$(BIN)/python -m examples.demo
	@printf "\nTo use qwen2vl yourself: source $(VENV)/bin/activate (puts qwen2vl on PATH), or: make shell\n"

# A shell with the environment active, so `qwen2vl` is on PATH
shell: $(BIN)/.demo
	@echo "qwen2vl is on PATH here; exit to leave"; . $(BIN)/activate && exec $${SHELL:-bash} -i

# The agent's browser environment: Debian's Chromium and its driver, from apt when they are missing
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromium-driver with apt"; \
	  $(SUDO) apt-get install -y -q chromium chromium-driver || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; }; }

# pytest's last line gives the suite's duration; --durations names the five slowest tests above it
test: $(BIN)/.installed browser
	$(BIN)/python -m pytest -q -m "not slow and not cuda" --durations=5

test-all: $(BIN)/.installed browser
	$(BIN)/python -m pytest -q -m "not cuda"

# On a machine with a CUDA GPU: fails, rather than skips, where torch sees none
test-cuda: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m cuda tests/test_cuda.py

bench: $(BIN)/.installed
	$(BIN)/python bench/preprocess_speed.py
	$(BIN)/python bench/linear_speed.py
	$(BIN)/python bench/model_speed.py
