# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of PyTorch first, so the `torch>=2.5` requirement below is already met (no CUDA download)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnkit translate train --out runs/demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest

# the benchmark's optional anchors (PyTorch Geometric's GATConv, lucidrains' local-attention), small pure-Python
# packages; torch is already installed, so pip keeps the CPU build
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	OMP_NUM_THREADS=2 $(BIN)/attnkit bench --repeats 9 --out runs/bench

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
