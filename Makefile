# Every target sets up what it needs, idempotently, in $(VENV).
#   make demo   the main job (see README)
#   make test   lint + the CPU test suite (what CI runs)
#   make bench  the backbone benchmark (writes benchmarks/results/)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint format bench clean

setup: $(VENV)/.deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch/torchvision first, in one command (they lie on these machines' disks; a lone `torch` would pull
# another build). Skipped when the venv already has a working pair.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH)
	touch $@

# The package in editable mode with its extras; re-run whenever pyproject.toml changes. The torch pins go in
# the same command so that nothing here can swap the torch build.
$(VENV)/.deps: pyproject.toml $(VENV)/.torch
	$(PIP) install $(TORCH) -e ".[deepspeed,dev]"
	touch $@

demo: setup
	$(PY) pretrain/embed_dicom_demo.py --output_dir outputs/demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/backbone.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
