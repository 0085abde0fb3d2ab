# Two commands do all the set-up on a fresh machine (Python 3.10+, no GPU needed):
#   make train   - create .venv, install, run the embedded default job (GRPO on the digits toy, CPU, ~3 min)
#   make test    - create .venv, install, run the test suite (what CI runs)
# TORCH picks the torch build: the default is the CPU wheel; on a CUDA machine use e.g. `make TORCH=torch train`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
ARGS ?=

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[dev]"
	# OCR reward models (ONNX, in the wheel); --no-deps keeps its GUI opencv-python out (headless is installed).
	$(VENV)/bin/pip install -q --no-deps "rapidocr-onnxruntime==1.4.4"
	touch $@

.PHONY: install train test test-all bench
install: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/python -m launch.train $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(ARGS)

test-all: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m "slow or not slow" $(ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/throughput.py $(ARGS)
