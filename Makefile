# `make train` and `make test` each create or refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
DATASET ?= uoft-cs/cifar10
ARGS ?=
BIN := $(VENV)/bin

.PHONY: train test test-slow smoke benchmarks-quick lint docs lock clean

# The exact versions the suite was run with (requirements.lock), then the package itself, editable, adding nothing.
# Reinstalled whenever the lock or the package metadata changes.
$(VENV)/.installed: requirements.lock setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# Refresh requirements.lock: the newest releases setup.cfg allows (torch as requirements-torch.txt pins it).
# Then run `make test` and commit the lock with what it changed.
lock: $(VENV)/.installed
	$(BIN)/pip-compile --quiet --upgrade --extra dev --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links --constraint requirements-torch.txt --output-file requirements.lock setup.cfg

train: $(VENV)/.installed
	$(BIN)/accelerate launch --quiet --config_file accelerate_config.yaml train.py --dataset $(DATASET) $(ARGS)

# The suite less the tests marked slow (under 10 minutes on 2 cores); CI runs both.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow" --durations=15 tests

# What launches several processes or signals whole process groups (accelerate launch, SIGTERM, Ctrl-C).
test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow --durations=15 tests

# A short real-data training that must reach a measured accuracy floor (run by .ci/run).
smoke: $(VENV)/.installed
	$(BIN)/python tests/smoke_real_data.py --dataset $(or $(CIFAR10_DIR),../shared/cifar10)

# Every benchmark end to end on a small subset (run by .ci/run so that they keep working).
benchmarks-quick: $(VENV)/.installed
	$(BIN)/python benchmarks/data_throughput.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10)
	$(BIN)/python benchmarks/loop_overhead.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10)
	$(BIN)/python benchmarks/airbench_parts.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10)
	$(BIN)/python benchmarks/hub_model_data_path.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10)
	$(BIN)/python benchmarks/time_to_accuracy.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10) \
		--results_dir $(or $(TMPDIR),/tmp)
	$(BIN)/python benchmarks/gpu_session.py --quick --dataset $(or $(CIFAR10_DIR),../shared/cifar10) \
		--out $(or $(TMPDIR),/tmp)/gpu_session

# Style, then the import contracts of setup.cfg (no cycle; each layer imports only those below it).
lint: $(VENV)/.installed
	$(BIN)/ruff check cifar_accel tests benchmarks tools train.py push_model.py
	$(BIN)/ruff format --check cifar_accel tests benchmarks tools train.py push_model.py
	$(BIN)/lint-imports

# The documentation site (mkdocs.yml, docs/), built with --strict so that a broken link or page fails.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(or $(TMPDIR),/tmp)/cifar_accel_site

clean:
	rm -rf $(VENV) output
