"""Where the Triton kernel tests run: `-m gpu` on CUDA, and on CPU through Triton's interpreter when
SPARROW_TRITON_INTERPRET=1 (and triton is installed). Import this before any kernel module: the interpreter flag must
be in the environment when Triton compiles (imports) a kernel. `make test-kernels` runs every tests/test_*.py that
imports this module (less its `gpu` cases) that way in .venv-sglang: import it directly, not through another test."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("SPARROW_TRITON_INTERPRET") == "1" and HAS_TRITON and not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
interpret_only = pytest.mark.skipif(not INTERPRET, reason="set SPARROW_TRITON_INTERPRET=1 (CPU, triton installed)")
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cpu", marks=interpret_only)]
