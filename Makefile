# The whole set-up on a fresh machine: `make repro` (the pipeline on the embedded data), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch by default; for CUDA: make repro TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements.lock)
TRIALS ?= 7

.PHONY: install repro test lint sweep bench mlflow-ui params clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, alone and without its dependencies, so only torch itself is looked up on the PyTorch
	# index (its dependencies are pinned in the lock and come from PyPI)
	$(BIN)/python -m pip install -q --no-deps torch==$(TORCH_VERSION) --extra-index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

repro: install
	$(BIN)/vaerepro fetch
	# the materialised data hash to exactly what data.dvc records; this puts them in the local DVC cache
	$(BIN)/dvc commit --force --quiet data.dvc
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

params: install
	$(BIN)/vaerepro params

bench: install
	$(BIN)/python benchmarks/bench.py

# An Optuna study through the vaerepro_optuna Hydra sweeper (conf/sweep/aevb.yaml); again = resume.
sweep: install
	$(BIN)/vaerepro run --multirun +sweep=aevb hydra.sweeper.n_trials=$(TRIALS)

# The MLflow UI on 127.0.0.1:5000; prints the link that opens the runs table set up for comparing runs.
mlflow-ui: install
	$(BIN)/vaerepro ui --port 5000

clean:
	rm -rf prepared models metrics plots artifacts reports runs outputs multirun
