"""Programmatic dependent launch of the decode kernels (`SPARROW_PDL`, attention/kernels/pdl.py).

PDL changes when a kernel's programs start, never what they compute: on an sm_90+ GPU (`-m gpu`) a captured chain of
the decode kernels and the engine's graph decode write the same bits with and without it, replay after replay (a
missing wait would show up as a race). CPU: the switch is validated and stays off.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import random_prompts
from triton_helpers import HAS_TRITON

from sparrow_sgl.config import EngineConfig, Schedule
from sparrow_sgl.engine import Engine, SamplingParams

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="programmatic dependent launch needs an sm_90+ GPU")


def test_pdl_switch_is_validated_and_off_on_cpu(monkeypatch):
    from sparrow_sgl.attention.kernels import pdl

    monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    assert not pdl.pdl_env() and pdl.launch_options(False) == {}
    monkeypatch.setenv(pdl.PDL_ENV, "yes")
    with pytest.raises(ValueError, match="SPARROW_PDL='yes'"):
        pdl.pdl_env()
    monkeypatch.setenv(pdl.PDL_ENV, "1")
    assert pdl.pdl_env() and not pdl.pdl_on(torch.device("cpu"))
    assert pdl.launch_options(True) == {"launch_pdl": True}


def _chain(x: torch.Tensor, weights: list[torch.Tensor], norm_w: torch.Tensor, pdl: bool) -> torch.Tensor:
    """A decode layer's kernel order, repeated: add + RMSNorm, a small-M GEMM (split-K), SiLU x up, a GEMM (the
    norm and SiLU kernels read SPARROW_PDL, `linear` takes `pdl`)."""
    from sparrow_sgl.attention.kernels.triton_fused import add_rms_norm, silu_mul
    from sparrow_sgl.attention.kernels.triton_linear import linear

    residual = None
    for up, down in zip(weights[::2], weights[1::2]):
        h, residual = add_rms_norm(x, residual, norm_w, 1e-6)
        x = linear(silu_mul(linear(h, up, pdl=pdl)), down, pdl=pdl)
    return add_rms_norm(x, residual, norm_w, 1e-6)[0]


@pytest.mark.gpu
@needs_sm90
def test_a_captured_kernel_chain_writes_the_same_bits_with_pdl(monkeypatch):
    from sparrow_sgl.attention.kernels import pdl

    torch.manual_seed(0)
    dev = torch.device("cuda")
    hidden, inter, layers = 1024, 2816, 12
    weights = []
    for _ in range(layers):
        weights += [torch.randn(2 * inter, hidden, device=dev, dtype=torch.bfloat16) / hidden**0.5,
                    torch.randn(hidden, inter, device=dev, dtype=torch.bfloat16) / inter**0.5]
    norm_w = torch.rand(hidden, device=dev, dtype=torch.bfloat16) + 0.5
    x = torch.randn(24, hidden, device=dev, dtype=torch.bfloat16)
    outs = {}
    for on in ("0", "1"):
        monkeypatch.setenv(pdl.PDL_ENV, on)
        eager = _chain(x, weights, norm_w, on == "1")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _chain(x, weights, norm_w, on == "1")
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = _chain(x, weights, norm_w, on == "1")
        for _ in range(5):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static, eager)
        outs[on] = eager
    assert torch.equal(outs["0"], outs["1"])


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_with_pdl_decodes_the_same_tokens_and_logprobs(tiny_model_dir, monkeypatch, dtype):
    """Dense and sparse layers (a mixed schedule, layer 0 dense), Triton GEMMs forced for bf16."""
    from sparrow_sgl.attention.kernels import pdl

    monkeypatch.setenv("SPARROW_LINEAR", "triton")
    schedule = Schedule(budgets=[None, 16, 24, 20], page_size=4, bin_tokens=32, dense_layers=[0], name="mixed")
    prompts = random_prompts([30, 52, 9, 77, 40], seed=11)
    params = SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)
    runs = {}
    for on in ("0", "1"):
        monkeypatch.setenv(pdl.PDL_ENV, on)
        engine = Engine(EngineConfig(model=str(tiny_model_dir), device="cuda", dtype=dtype, page_size=4,
                                     num_kv_pages=400, max_model_len=512))
        runs[on] = engine.generate(prompts, params, schedule=schedule, progress=False)
        assert all(step.graph is not None for step in engine.runner.gpu_decoder().steps.values())
    for got, want in zip(runs["1"], runs["0"]):
        assert got.token_ids == want.token_ids
        assert got.logprobs == want.logprobs


@pytest.mark.gpu
@needs_sm90
def test_a_pdl_gemm_whose_early_weight_tile_does_not_fit_waits_first():
    """128 x 256 tiles in 2 stages fill shared memory: the PDL launch drops its early tile, same bits."""
    from sparrow_sgl.attention.kernels import triton_linear as tl

    torch.manual_seed(2)
    x = torch.randn(32, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) / 2048**0.5
    config = tl.Config(128, 256, 2, 8, 2)
    assert torch.equal(tl.linear(x, w, None, config, pdl=True), tl.linear(x, w, None, config))
    assert any(key[0] == config for key in tl._NO_EARLY_W)
