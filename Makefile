# The two commands of README.md: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint setup

setup:
	bash scripts/setup_env.sh $(VENV) test,dev

demo: setup
	$(VENV)/bin/sparrow demo

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(PY) -m pytest -q
