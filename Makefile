# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test browser bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of PyTorch first, so the `torch>=2.5` requirement below is already met (no CUDA download)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -m attnkit.kernels._native --build  # the compiled CPU kernel; never fails setup (no compiler: a notice)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnkit translate train --out runs/demo

# headless Chromium for the explorer's browser tests (tests/browser.py); installed when missing and we are root with
# apt-get. Never fails the build: without it those tests are skipped and say why.
browser:
	@if [ ! -x /usr/bin/chromedriver ] || [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver for the browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	      >/dev/null) || echo "could not install chromium: the browser tests will be skipped"; \
	  else \
	    echo "no /usr/bin/chromium + /usr/bin/chromedriver (need root and apt-get): browser tests will be skipped"; \
	  fi; \
	fi

test: $(STAMP) browser
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
