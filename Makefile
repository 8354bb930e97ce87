# Two commands: `make run` (the service on embedded defaults) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
# pytest-xdist processes for `make test`; a test file runs whole on one of them (its module fixtures built once)
TEST_WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: run test lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

## Migrate, build the demo model if missing, print an admin key, run API + worker + scheduler on SQLite.
run: venv
	$(BIN)/unlearnd up

## Start PostgreSQL and Redis if they are down, install Chromium if missing, lint, run every test.
test: venv
	bash .ci/services
	bash .ci/chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) var
