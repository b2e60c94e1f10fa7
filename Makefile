# `make test` is the one test command (README, CI): venv, install, ruff, mypy, pytest.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo install lint typecheck pytest faults bench clean

$(BIN)/tokend: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

install: $(BIN)/tokend

demo: install
	$(BIN)/tokend demo

lint: install
	$(BIN)/ruff check daemon tests bench

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q

test: lint typecheck pytest

faults: install
	$(BIN)/pytest -q -m faults

bench: install
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
