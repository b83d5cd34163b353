# `make run` and `make test` each set up their own virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make run PORT=9000`, or `HUB_PORT=9000 make run`; 8080 otherwise.
PORT ?= $(or $(HUB_PORT),8080)

.PHONY: run test bench lint

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade 'pip>=23' 'setuptools<81'
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# TypeScript, for the type check of the browser code (static/), exactly as package-lock.json
# pins it; reinstalled when the lockfile changes, like the venv.
node_modules/.installed: package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

run: $(BIN)/.installed
	$(BIN)/hub --host 127.0.0.1 --port $(PORT) --demo

lint: $(BIN)/.installed node_modules/.installed
	$(BIN)/ruff check hub handlers tests bench
	$(BIN)/ruff format --check hub handlers tests bench
	$(BIN)/mypy
	node_modules/.bin/tsc -p tsconfig.json

test: lint
	$(BIN)/pytest -q

bench: $(BIN)/.installed
	$(BIN)/python -m bench
