# The whole set-up on a fresh machine: `make repro` (the pipeline on the embedded data), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch by default; for CUDA: make repro TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements.lock)
TRIALS ?= 7

.PHONY: install repro test lint sweep bench mlflow-ui params clean exps plots-template

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

repro: install plots-template
	$(BIN)/vaerepro fetch
	# the materialised data hash to exactly what data.dvc records; this puts them in the local DVC cache
	$(BIN)/dvc commit --force --quiet data.dvc
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@if git status --porcelain -- dvc.lock metrics plots 2>/dev/null | grep -q .; then \
	    echo "Commit the results, the baseline that dvc metrics diff, dvc params diff and dvc exp show compare with:"; \
	    echo "    git add dvc.lock metrics plots && git commit -m 'Results of the pipeline'"; fi
	@echo "The commands the README gives (vaerepro, dvc exp run, dvc metrics show, ...) are .venv's: source $(BIN)/activate"

# `dvc exp show` narrowed to what compares runs: what was evaluated and the headline numbers always, other
# params and metrics where they differ between the rows, no hashes of stage outputs. Plain `dvc exp show`
# has a column for every key of params.yaml (65) and every file a stage reads, ~1,000 characters; DVC has no
# setting to narrow it. Dropped params: those the metrics' labels repeat, and allow_improper, which differs
# whenever the likelihood does (only bernoulli has the key; an improper run shows as data.space=continuous).
# Dropped too: the time created, and training's best validation ELBO (the test numbers are the headline):
# the numbers in nats are named by data space, log p(x) and its SE by K too (binary.log_px_k1000), so
# experiments in two spaces have three columns each (at two K, log p(x) and its SE two each), and the table
# stays within about 225 columns. Experiments evaluated before K was in the names have binary.log_px. The
# convergence verdict is kept beside log p(x): where every row's is the same (all unconverged), --only-changed
# would hide it, and a sort by log p(x) would then rank estimates that may still be far from it unmarked.
EXPS_KEEP := ^(likelihood|latent_dim|(binary|continuous|improper)\.(log_px(_k[0-9]+)?(_se)?|elbo)|knn_accuracy|converged)$$
EXPS_DROP := ^(Created|.+\.best_val_elbo|likelihood\.(name|allow_improper)|model\.latent_dim|\.params-checked|prepared|models|artifacts|metrics/.+|plots/.+)$$
exps: install
	$(BIN)/dvc exp show --only-changed --keep '$(EXPS_KEEP)' --drop '$(EXPS_DROP)'

# `dvc plots show` offline: DVC's page loads vega, vega-lite and vega-embed from a CDN (blank without a
# network); this template has them inlined (~0.8 MB), and .dvc/config.local points DVC at it. Without npm or
# a network it says so, and `dvc plots show` keeps DVC's page.
VEGA := vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
PLOTS_TEMPLATE := vendor/dvc-plots.html
# the minified build of package $(1) (name@version) from the tarball `npm pack` wrote into $$tmp
vega_js = tar -xzOf "$$tmp/$(subst @,-,$(1)).tgz" package/build/$(firstword $(subst @, ,$(1))).min.js

plots-template: $(PLOTS_TEMPLATE) | $(VENV)/.installed
	@if test -f $(PLOTS_TEMPLATE); then $(BIN)/dvc config --local plots.html_template ../$(PLOTS_TEMPLATE); fi

$(PLOTS_TEMPLATE): Makefile
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT; \
	if ! (cd "$$tmp" && npm pack --silent --fetch-retries=0 --fetch-timeout=30000 $(VEGA) > /dev/null); then \
	    echo "plots-template: npm could not fetch $(VEGA); dvc plots show loads them from a CDN"; exit 0; fi; \
	mkdir -p $(@D) && { \
	    printf '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n{refresh_tag}\n<title>DVC Plot</title>\n'; \
	    $(foreach s,$(VEGA),printf '<script>\n'; $(call vega_js,$(s)); printf '\n</script>\n';) \
	    printf '<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n'; \
	} > $@.tmp && mv $@.tmp $@ && echo "plots-template: $@ has $(VEGA) inlined"

# Two pytest workers, each test file on one of them (its module fixtures built once): most slow tests wait
# on subprocesses (trainings, DVC, MLflow, sweeps), so two files at once use both cores.
test: install plots-template
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check src tests benchmarks

params: install
	$(BIN)/vaerepro params

# The README's performance table: full-MNIST-length epochs (500 steps), as users train.
bench: install
	$(BIN)/python benchmarks/bench.py --mnist-size --epochs 5 $(BENCH_ARGS)

# An Optuna study through the vaerepro_optuna Hydra sweeper (conf/sweep/aevb.yaml); again = resume.
sweep: install
	$(BIN)/vaerepro run --multirun +sweep=aevb hydra.sweeper.n_trials=$(TRIALS)

# The MLflow UI on 127.0.0.1:5000; prints the link that opens the runs table set up for comparing runs.
mlflow-ui: install
	$(BIN)/vaerepro ui --port 5000

clean:
	rm -rf prepared models metrics plots artifacts reports runs outputs multirun dvc_plots
