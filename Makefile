# The two commands of the course are `make lab` and `make test`; the rest serve them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# On the course machines the CPU build of torch waits in /opt/wheels.
PIP_FLAGS := -c constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
# Jupyter refuses to run as root (containers, CI) unless told that it is meant.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=600 \
         --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: lab test lint lessons clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "sdscratch needs Python 3.11 or newer"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) -e ".[test]"
	touch $(STAMP)

## make lab: create .venv if needed and open JupyterLab on the lessons
lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.root_dir=lessons $(ROOT_FLAG) $(LAB_ARGS)

## make test: lint, unit tests, and every lesson run top to bottom as a test
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadscope $(NBVAL) tests lessons

lint: $(STAMP)
	$(BIN)/ruff check .

## make lessons: re-execute every lesson and store its outputs in the notebook
lessons: $(STAMP)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=600 lessons/*.ipynb

clean:
	rm -rf $(VENV) _build .pytest_cache .ruff_cache
