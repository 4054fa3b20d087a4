# `make train` and `make test` each create or refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
DATASET ?= uoft-cs/cifar10
ARGS ?=
BIN := $(VENV)/bin

.PHONY: train test smoke benchmarks-quick lint clean

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

# Every benchmark end to end on a small subset (run by .ci/run so that they keep working).
benchmarks-quick: $(VENV)/.installed
	$(BIN)/python benchmarks/data_throughput.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10)
	$(BIN)/python benchmarks/loop_overhead.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10)
	$(BIN)/python benchmarks/airbench_parts.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10)
	$(BIN)/python benchmarks/time_to_accuracy.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10) \
		--results_dir $(or $(TMPDIR),/tmp)

lint: $(VENV)/.installed
	$(BIN)/ruff check cifar_accel tests benchmarks train.py push_model.py

clean:
	rm -rf $(VENV) output
