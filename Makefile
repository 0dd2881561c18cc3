# The two commands of README.md: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# SGLang (torch 2.14.1, transformers 5.19.0) gets its own venv so that the core stays on the CPU torch build; OpenRLHF
# 0.11.2 (with --no-deps, beside its pure dependencies: scripts/setup_env.sh) lives in that venv too.
# `make test` = test-core (.venv), test-kernels, test-sglang, test-openrlhf (.venv-sglang). test-kernels runs the
# Triton kernel tests on CPU through Triton's interpreter: the core venv has no triton and skips them.
VENV ?= .venv
SGLANG_VENV ?= .venv-sglang
PY := $(VENV)/bin/python
SGLANG_TESTS := $(wildcard tests/test_sglang_*.py)
OPENRLHF_TESTS := $(wildcard tests/test_openrlhf_*.py)
# Every test file that imports tests/triton_helpers.py (its kernel cases run on CPU when SPARROW_TRITON_INTERPRET=1).
KERNEL_TESTS := $(shell grep -l triton_helpers tests/test_*.py)

.PHONY: demo test test-core test-kernels test-sglang test-openrlhf lint setup setup-sglang

setup:
	bash scripts/setup_env.sh $(VENV) test,dev

setup-sglang:
	bash scripts/setup_env.sh $(SGLANG_VENV) test,sglang,openrlhf

demo: setup
	$(VENV)/bin/sparrow demo

lint: setup
	$(VENV)/bin/ruff check .

test: test-core test-kernels test-sglang test-openrlhf

test-core: setup
	$(PY) -m pytest -q

# The whole of each file but its `gpu` cases: the interpreter cases (~50 s on 2 cores) and, again, the files' pure CPU
# tests (~10 s). `import triton` first: without triton every interpreter case would skip and the target still pass.
test-kernels: setup-sglang
	@test -n "$(KERNEL_TESTS)" || { echo "test-kernels: no test file imports tests/triton_helpers.py"; exit 1; }
	$(SGLANG_VENV)/bin/python -c "import triton"
	SPARROW_TRITON_INTERPRET=1 $(SGLANG_VENV)/bin/python -m pytest -q -m "not gpu" $(KERNEL_TESTS)

test-sglang: setup-sglang
	$(SGLANG_VENV)/bin/python -m pytest -q $(SGLANG_TESTS)

test-openrlhf: setup-sglang
	$(SGLANG_VENV)/bin/python -m pytest -q $(OPENRLHF_TESTS)
