# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup data tools triton demo test test-fast bench-triton models parm-models lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

data:
	@scripts/ensure-data.sh

# Prometheus and promtool, which the metrics tests run against (skipped where they cannot be had).
tools:
	@scripts/ensure-tools.sh

# Triton (through nvidia-pytriton) and KServe in .venv-triton, for the tests in front of real
# V2 servers (skipped where they cannot be installed).
triton:
	@PYTHON=$(PYTHON) scripts/ensure-triton.sh

setup: $(STAMP) data tools triton

demo: setup
	$(BIN)/collage demo

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# The front end's overhead in front of a real Triton beside its own worker's (`collage bench-serving`).
bench-triton: setup
	scripts/bench-triton.sh

# Retrain the s-CNN and the collage models from scratch and re-export ONNX (about 27 minutes on 2 cores).
models: setup
	$(BIN)/collage train --preset all

# ParM's parity models for the shipped s-CNN (k = 2 and 4, concatenation and sum encoders).
parm-models: setup
	$(BIN)/collage train --preset parm

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) .venv-triton build *.egg-info .pytest_cache
