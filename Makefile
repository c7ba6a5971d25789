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

# The suite runs in two phases. First every test but the `serial` ones, on PYTEST_WORKERS
# pytest-xdist workers: most of the suite's time is spent waiting (on servers, subprocesses,
# leases running out), so 3 workers keep this 2-core machine busy without starving anyone.
# Then the `serial` tests alone: they assert wall-clock bounds (a timeout within 1.5 s, a
# wakeup within 1 s), or are multi-process storms on 2 s leases (2,000 handler calls, each
# a chance for a neighbour's CPU burst to stall one past its lease), that a busy neighbour
# could break. pytest's exit 5 (no test selected,
# e.g. PYTEST_ARGS naming a file without serial tests) is not a failure of the second phase.
PYTEST_WORKERS ?= 3
test: lint typecheck docs wheel-check
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not serial" $(PYTEST_ARGS)
	$(BIN)/pytest -m serial $(PYTEST_ARGS) || test $$? -eq 5

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
	$(BIN)/python benchmarks/messaging.py
	$(BIN)/python benchmarks/messaging_transactional.py
	$(BIN)/python benchmarks/sql.py
	$(BIN)/python benchmarks/optimistic.py --markdown
	$(BIN)/python benchmarks/statemachine.py
	$(BIN)/python benchmarks/dedup.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) .pytest_cache .mypy_cache .ruff_cache
