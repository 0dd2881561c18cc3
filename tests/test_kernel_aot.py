"""bench.kernel_aot compiles the small-M GEMM for sm_90a without a GPU and reports its resources (a subprocess:
this test session may run Triton's interpreter, which replaces the kernels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from triton_helpers import needs_triton

ROOT = Path(__file__).resolve().parents[1]


@needs_triton
def test_reports_registers_shared_memory_and_occupancy():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARROW_TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_aot", "--tiles", "32x64x2", "--m", "16"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("this Triton ships no ptxas")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["span"]) for r in rows} == {("_linear_kernel", "gemm"), ("_linear_kernel", "down+silu")}
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["shared_bytes"] > 0 and row["programs_per_sm"] >= 1, row


def test_bad_tiles_are_named(capsys):
    from bench import kernel_aot

    with pytest.raises(SystemExit):
        kernel_aot.main(["--tiles", "64x64"])
    assert "block_n x block_k x stages" in capsys.readouterr().err
