# Set-up and everyday commands. Every target creates .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-all bench bench-plan install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamps re-run pip only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/kwconvert resnet50 --budget 0.5

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow" -n 2 $(PYTEST_ARGS)

test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

bench-plan: $(VENV)/.installed
	$(BIN)/python benchmarks/plan_speed.py

clean:
	rm -rf $(VENV) kwconvert-out .pytest_cache
