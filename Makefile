# Thin wrappers: dev.py does the work with nothing but Python 3.11+.
PYTHON ?= python3

.PHONY: test demo faults bench clean

test:
	$(PYTHON) dev.py test

demo:
	$(PYTHON) dev.py demo

faults:
	$(PYTHON) dev.py faults

bench:
	$(PYTHON) dev.py bench

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
