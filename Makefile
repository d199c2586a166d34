# The two set-up commands of the README: `make up` (install + migrate + run) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: a looser spec would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,quant]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/atelier db upgrade
	$(BIN)/atelier up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The tests that need no Ray, Redis or PostgreSQL and build no pipelines (well under a minute);
# one that reaches for a service anyway fails, naming it. `make test` stays the whole suite.
test-fast: $(STAMP)
	ATELIER_TEST_FAST=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not services and not pipelines" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
