# The two commands the README promises: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck docs wheel-check bench clean

# `make demo` installs only what the demo needs (oncely[demo]) in its own venv, not the test stack.
DEMO_VENV := .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed
DEMO_ARGS ?=

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml
	$(PY) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[demo]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/oncely demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/ruff format --check src tests benchmarks examples tools

typecheck: $(STAMP)
	$(BIN)/mypy --strict src/oncely

test: lint typecheck docs wheel-check
	$(BIN)/pytest $(PYTEST_ARGS)

# The reference (docs/reference.md) is generated from the docstrings: a broken reference fails.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet --site-dir .site

# Build the wheel, install it in a fresh venv, import it and run `oncely --version`.
wheel-check: $(STAMP)
	PY=$(BIN)/python .ci/wheel-check

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[all,dev,bench]'
	$(BIN)/python benchmarks/decorator.py
	$(BIN)/python benchmarks/locks.py
	$(BIN)/python benchmarks/http_middleware.py
	$(BIN)/python benchmarks/sql.py
	$(BIN)/python benchmarks/optimistic.py --markdown
	$(BIN)/python benchmarks/messaging.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) .pytest_cache .mypy_cache .ruff_cache
