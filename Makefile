# The two commands the README promises: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck docs wheel-check bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
