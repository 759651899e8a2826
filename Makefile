# The two commands of the README. Each sets itself up on a fresh machine: a virtual environment in
# .venv, torch first (TORCH pins the build: the CPU wheel here; pass TORCH=torch for your CUDA build),
# then thinktok and its dependencies.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test install bench

$(BIN)/thinktok: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/thinktok

quickstart: install
	$(BIN)/thinktok sample --model tiny --mode vocab --num-thinking 64 --prompt "12 * 34 =" --num-samples 4 --max-new-tokens 32

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/thinktok bench rollout
