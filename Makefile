# `make run` sets up a virtual environment (.venv) with what the hub needs to run;
# `make test` adds the test toolchain (setup.cfg's `test` extras) to the same one. Each step
# has its own marker, redone when setup.cfg or pyproject.toml changes: `make run` after
# `make test` installs nothing, `make test` after `make run` installs only the extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make run PORT=9000`, or PORT (else HUB_PORT) in the environment, as the README's recipes
# read it; 8080 where none is set or it is empty.
PORT := $(or $(PORT),$(HUB_PORT),8080)

.PHONY: run test bench lint

# The runtime dependencies only. ('pip>=23' upgrades only an older pip: editable installs of a
# setup.cfg project need a recent one.)
$(BIN)/.installed-run: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q 'pip>=23'
	$(BIN)/python -m pip install -q -e .
	touch $@

# pytest, Playwright, hypothesis, httpx, mypy, ruff: on top of the runtime install.
$(BIN)/.installed-test: $(BIN)/.installed-run
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# TypeScript, for the type check of the browser code (static/), exactly as package-lock.json
# pins it; reinstalled when the lockfile changes, like the venv.
node_modules/.installed: package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

run: $(BIN)/.installed-run
	$(BIN)/hub --host 127.0.0.1 --port $(PORT) --demo

lint: $(BIN)/.installed-test node_modules/.installed
	$(BIN)/ruff check hub handlers tests bench
	$(BIN)/ruff format --check hub handlers tests bench
	$(BIN)/mypy
	node_modules/.bin/tsc -p tsconfig.json

test: lint
	$(BIN)/pytest -q

# the benchmark needs the runtime dependencies only (bench.faults, which reuses the tests'
# Redis helpers, runs under `make test`)
bench: $(BIN)/.installed-run
	$(BIN)/python -m bench
