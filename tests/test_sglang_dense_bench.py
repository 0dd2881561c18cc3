"""bench.sglang_dense_decode: clear refusals on CPU; on a GPU, one small layer per kernel with agreeing outputs."""

from __future__ import annotations

import pytest
import torch

from bench import sglang_dense_decode as bench


def test_unknown_model_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--models", "qwen3-70b"])
    assert "unknown models ['qwen3-70b']" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_without_a_gpu_the_benchmark_says_so():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--models", "qwen3-4b", "--contexts", "1k"])


@pytest.mark.gpu
def test_one_layer_per_kernel_agrees_with_flashinfer(tmp_path):
    pytest.importorskip("flashinfer")
    rows = bench.main(["--models", "qwen3-4b", "--contexts", "1k", "--reps", "3", "--results-dir", str(tmp_path)])
    assert [r["kernel"] for r in rows] == ["flashinfer-sglang-nhd", "triton-nhd", "triton-hnd"]
    assert all(r["layer_us"] > 0 and r["max_rel_err_vs_flashinfer"] < 2e-2 for r in rows)
