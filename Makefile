# The two commands of README.md: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# SGLang (torch 2.14.1, transformers 5.19.0) gets its own venv so that the core stays on the CPU torch build; OpenRLHF
# 0.11.2 (with --no-deps, beside its pure dependencies: scripts/setup_env.sh) lives in that venv too.
VENV ?= .venv
SGLANG_VENV ?= .venv-sglang
PY := $(VENV)/bin/python
SGLANG_TESTS := $(wildcard tests/test_sglang_*.py)
OPENRLHF_TESTS := $(wildcard tests/test_openrlhf_*.py)

.PHONY: demo test test-core test-sglang test-openrlhf lint setup setup-sglang

setup:
	bash scripts/setup_env.sh $(VENV) test,dev

setup-sglang:
	bash scripts/setup_env.sh $(SGLANG_VENV) test,sglang,openrlhf

demo: setup
	$(VENV)/bin/sparrow demo

lint: setup
	$(VENV)/bin/ruff check .

test: test-core test-sglang test-openrlhf

test-core: setup
	$(PY) -m pytest -q

test-sglang: setup-sglang
	$(SGLANG_VENV)/bin/python -m pytest -q $(SGLANG_TESTS)

test-openrlhf: setup-sglang
	$(SGLANG_VENV)/bin/python -m pytest -q $(OPENRLHF_TESTS)
