# One entry point. `make test` creates .venv when missing, installs the project with the pinned
# versions (only when pyproject.toml or constraints.txt changed), then runs the fast test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_atconv.py

lint: $(STAMP)
	$(PY) -m ruff check sit_atconv tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
