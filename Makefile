# `make train` and `make test` each create or refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
DATASET ?= uoft-cs/cifar10
ARGS ?=
BIN := $(VENV)/bin

.PHONY: train test smoke lint clean

# Reinstall whenever the package metadata changes; the code itself is installed editable.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

train: $(VENV)/.installed
	$(BIN)/accelerate launch --quiet --config_file accelerate_config.yaml train.py --dataset $(DATASET) $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

# A short real-data training that must reach a measured accuracy floor (run by .ci/run).
smoke: $(VENV)/.installed
	$(BIN)/python tests/smoke_real_data.py --dataset $(or $(CIFAR10_DIR),../shared/cifar10)

lint: $(VENV)/.installed
	$(BIN)/ruff check cifar_accel tests train.py

clean:
	rm -rf $(VENV) output
