# Two commands do everything on a fresh machine with only python3:
#   make train   -> .venv, install, resnet-graph train original (seed recipe)
#   make test    -> .venv, install, lint (ruff, import-linter), pytest
# Installs take the versions the tests passed with (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test lint install clean

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/resnet-graph train original $(ARGS)

# ruff: pyflakes, pycodestyle errors and import order (ruff.toml); lint-imports: the
# layers of docs/architecture.md and the modules that must not need TensorFlow
# (.importlinter).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The suite runs in TEST_WORKERS processes (pytest-xdist; auto = one per core): most of its
# time is single-threaded (TensorFlow imports, subprocesses started and killed), so two cores
# take it about twice as fast. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info build dist .pytest_cache
