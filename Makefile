# The two commands of the README. Each sets itself up on a fresh machine: a virtual environment in
# .venv, torch first (TORCH pins the build: the CPU wheel here; pass TORCH=torch for your CUDA build),
# then thinktok and its dependencies at the versions of constraints.txt (the ranges are pyproject's).
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# the interpreter of `make gpu-suite`: the venv's here; on the GPU machine (no venv) PYTHON=python3
PYTHON ?= $(BIN)/python
GPU_SUITE_OUT ?= runs/gpu-suite
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart sample test install lock bench gpu-suite

$(BIN)/thinktok: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(BIN)/thinktok

# constraints.txt: the versions of everything but torch and triton in this venv, once `make test` passed
lock:
	{ sed -n '1,/^# here/p' constraints.txt; \
	  $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-)[=_-]'; } > constraints.new
	mv constraints.new constraints.txt

# RL on the embedded default (local Ray, CPU, tiny model); each call writes a new run directory
quickstart: install
	$(BIN)/thinktok train configs/quickstart.yaml run_dir=runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

sample: install
	$(BIN)/thinktok sample --model tiny --mode vocab --num-thinking 64 --prompt "12 * 34 =" --num-samples 4 --max-new-tokens 32

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 -n 2 --dist loadfile --no-loadscope-reorder tests

bench: install
	$(BIN)/thinktok bench rollout
	$(BIN)/thinktok bench parallel
	$(BIN)/thinktok bench train

# Every GPU measurement in one command (docs/benchmarks.md): no install step, so it also runs from a
# source checkout on PYTHONPATH; JSON per part under GPU_SUITE_OUT; without CUDA it exits 1 at once.
gpu-suite:
	GPU_SUITE_OUT=$(GPU_SUITE_OUT) $(PYTHON) -m thinktok.gpu_suite $(SUITE_ARGS)
