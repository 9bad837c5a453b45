# Every target sets up what it needs, idempotently, in $(VENV).
#   make demo   the main job (see README)
#   make test   lint + the CPU test suite (what CI runs)
#   make evidence  issue 18's evidence table (SurvSet + full-PadChest pretraining, survival CV, label efficiency;
#               under two hours on a 2-core CPU (1:50 with setup, cores shared, 2026-12-06), resumable: re-run to
#               continue; writes outputs/evidence/EVIDENCE.md)
#   make bench  the speed/memory benchmarks (write benchmarks/results/; finetune_tasks.py is run on its own)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.14.1 torchvision==0.29.1
EXTRAS := deepspeed,dev,recipes,privacy,wsi,search,evidence,text
# The lock file: every package version the README's numbers were measured with (`make lock` re-resolves it).
LOCK   := constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint format bench evidence lock clean

setup: $(VENV)/.deps $(VENV)/.demo-data

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch/torchvision first, in one command (they lie on these machines' disks; a lone `torch` would pull
# another build). Skipped when the venv already has a working pair.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH)
	touch $@

# The package in editable mode with its extras, at the lock file's versions; re-run whenever pyproject.toml or
# the lock changes. The torch pins go in the same command so that nothing here can swap the torch build.
$(VENV)/.deps: pyproject.toml $(LOCK) $(VENV)/.torch
	$(PIP) install $(TORCH) -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

# Real data the demo cohort is built from, as shipped inside these pinned packages (see ../shared/data/README.md).
# --no-deps: we only read their data files (torchxrayvision and systole would pull plotting/CUDA-heavy stacks).
DEMO_DATA := torchxrayvision==1.5.7 systole==0.3.1 survset==0.2.11 pydicom-data==1.0.0
$(VENV)/.demo-data: Makefile $(VENV)/.deps
	$(PIP) install --no-deps $(DEMO_DATA)
	touch $@

# Re-resolve the lock file after changing dependencies: a throwaway venv gets what `make setup` installs, without
# the lock, and its `pip freeze` becomes $(LOCK) (commit it; tests/test_lock.py checks it covers pyproject.toml).
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH) -e ".[$(EXTRAS)]"
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-deps $(DEMO_DATA)
	{ echo "# make lock, $$(date -u +%Y-%m-%d), Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'): what make setup installs"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK) && rm -rf $(LOCK_VENV)

demo: setup
	$(PY) pretrain/demo_pipeline.py --output_dir outputs/demo
	$(PY) pretrain/run_pretrain.py --config pretrain/configs/demo.yaml --overwrite_output_dir
	$(PY) finetune/run_finetune.py finetune/configs/demo_survival.yaml --overwrite_output_dir true
	$(PY) finetune/run_finetune.py finetune/configs/demo_findings.yaml --overwrite_output_dir true

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Two pytest workers (pytest-xdist; one test file per worker, so module fixtures are built once), one torch thread
# each: on the 2-core CI machine this took the suite from 15:26 to 3:14-3:25 (6:53 for 885 tests on 2026-12-06, idle; 906 tests since 2026-12-07). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

evidence: setup
	$(PY) benchmarks/evidence.py --work_dir outputs/evidence

bench: setup
	$(PY) benchmarks/backbone.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/contrastive_loss.py
	$(PY) benchmarks/pretrain_step.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
