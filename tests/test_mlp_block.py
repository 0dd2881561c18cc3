"""The persistent MLP block (`triton_mlp_block.py`) against the chain it replaces: the fused add + RMSNorm, then the
small-M GEMMs with the same tiles. On CPU through Triton's interpreter (programs run one after another: the first
takes every item in queue order), on the GPU with every program live (`-m gpu`)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICES, needs_triton  # first: sets the interpreter flag before a kernel module imports

pytestmark = needs_triton


def _inputs(m: int, hidden: int, inter: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dt).to(device)

    return (rand(m, hidden), rand(m, hidden), (1 + rand(hidden, scale=0.1).float()).to(dt),
            rand(2 * inter, hidden, scale=hidden**-0.5), rand(hidden, inter, scale=inter**-0.5))


def _torch_reference(x, res, nw, eps, wgu, wd):
    s = (x.float() + res.float()).to(x.dtype)
    h = (nw.float() * (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float())
    gu = (h.to(x.dtype).float() @ wgu.float().T).to(x.dtype)
    gate, up = gu.float().chunk(2, dim=-1)
    act = (torch.nn.functional.silu(gate).to(x.dtype).float() * up).to(x.dtype)
    return (act.float() @ wd.float().T).to(x.dtype), s


CASES = [  # (m, hidden, inter, gate_up (block_n, block_k, split), down (...), programs)
    (3, 64, 128, (32, 32, 1), (32, 32, 1), 1),
    (3, 64, 128, (32, 32, 2), (16, 32, 4), 5),
    (5, 96, 192, (128, 32, 1), (32, 64, 2), 3),  # 192 % 128: a ragged last gate_up tile; ragged K (96)
    (17, 64, 64, (16, 32, 2), (64, 16, 4), 64),  # more programs than items
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,hidden,inter,gu,down,programs", CASES)
def test_block_matches_the_chain(device, m, hidden, inter, gu, down, programs):
    from sparrow_sgl.attention.kernels.triton_fused import add_rms_norm, silu_mul
    from sparrow_sgl.attention.kernels.triton_linear import Config, linear, workspace
    from sparrow_sgl.attention.kernels.triton_mlp_block import BlockPlan, mlp_block

    x, res, nw, wgu, wd = _inputs(m, hidden, inter, device)
    gu_cfg, d_cfg = Config(*gu, 4, 2), Config(*down, 4, 2)
    out, res_out, h, act = mlp_block(x, res, nw, 1e-6, wgu, wd, BlockPlan(gu_cfg, d_cfg, programs),
                                     intermediates=True)
    h_ref, res_ref = add_rms_norm(x, res, nw, 1e-6)
    assert torch.equal(res_out, res_ref)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=2**-7)  # one bf16 ulp at most: float32 sums in another order
    # given the block's own normed input, each GEMM is the chain's, bit for bit (same tiles, same split order)
    assert torch.equal(act, silu_mul(linear(h, wgu, None, gu_cfg)))
    assert torch.equal(out, linear(act, wd, None, d_cfg))
    assert torch.equal(out, linear(linear(h, wgu, None, gu_cfg), wd, None, d_cfg, silu_input=True))
    ref_out, _ = _torch_reference(x, res, nw, 1e-6, wgu, wd)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=0.05, rtol=0.05)
    _, state = workspace(x.device, 0, 0)
    assert not state.any(), "the queue, flags and tickets must be left at zero for the next launch"
    again, _ = mlp_block(x, res, nw, 1e-6, wgu, wd, BlockPlan(gu_cfg, d_cfg, programs))
    assert torch.equal(again, out)


@pytest.mark.parametrize("device", DEVICES)
def test_default_plan_runs(device):
    from sparrow_sgl.attention.kernels.triton_mlp_block import default_plan, mlp_block

    x, res, nw, wgu, wd = _inputs(4, 128, 256, device, seed=1)
    plan = default_plan(4, 128, 256, x.device)
    assert plan.programs >= 2 and plan.gate_up.block_n == 64
    out, res_out = mlp_block(x, res, nw, 1e-6, wgu, wd, plan)
    ref_out, ref_res = _torch_reference(x, res, nw, 1e-6, wgu, wd)
    assert torch.equal(res_out, ref_res)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=0.05, rtol=0.05)


def test_bad_inputs_are_named():
    from sparrow_sgl.attention.kernels.triton_mlp_block import check_inputs

    x, res, nw, wgu, wd = _inputs(4, 64, 128, "cpu")
    with pytest.raises(ValueError, match="residual must be \\[4, 64\\]"):
        check_inputs(x, res[:3], nw, wgu, wd)
    with pytest.raises(ValueError, match="gate_up must be a contiguous torch.bfloat16 \\[256, 64\\]"):
        check_inputs(x, res, nw, wgu[:-1], wd)
    with pytest.raises(ValueError, match="1..64 rows in bf16/fp16"):
        check_inputs(x.float(), res.float(), nw.float(), wgu.float(), wd.float())
    with pytest.raises(ValueError, match="norm weight must be a contiguous torch.bfloat16"):
        check_inputs(x, res, nw.float(), wgu, wd)
    x2, res2, nw2, wgu2, wd2 = _inputs(4, 64, 96, "cpu")
    with pytest.raises(ValueError, match="multiple of 64"):
        check_inputs(x2, res2, nw2, wgu2, wd2)


@pytest.mark.gpu
@pytest.mark.parametrize("m,hidden,inter", [(25, 2560, 9728), (64, 4096, 12288)])
def test_model_shapes_in_a_graph(m, hidden, inter):
    """Qwen3-4B / 8B MLP shapes on the default plan, captured in a CUDA graph and replayed: the chain's output within
    bf16 rounding, the same bits on every replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from sparrow_sgl.attention.kernels.triton_mlp_block import mlp_block

    x, res, nw, wgu, wd = _inputs(m, hidden, inter, "cuda", seed=2)
    first, _ = mlp_block(x, res, nw, 1e-6, wgu, wd)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = mlp_block(x, res, nw, 1e-6, wgu, wd)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
    ref_out, _ = _torch_reference(x, res, nw, 1e-6, wgu, wd)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_next", [False, True])
def test_layer_block_matches_the_chain(device, with_next):
    """o_proj -> add + norm -> MLP [-> add + the next layer's norm -> its qkv] in one launch: each stage equals the
    chain's kernel on the block's own input (norms within one bf16 ulp: float32 sums in another order)."""
    from sparrow_sgl.attention.kernels.triton_fused import add_rms_norm, silu_mul
    from sparrow_sgl.attention.kernels.triton_linear import Config, linear, workspace
    from sparrow_sgl.attention.kernels.triton_mlp_block import BlockPlan, NextLayer, layer_block

    m, hidden, inter, q_size, n_qkv = 5, 64, 128, 80, 160  # q_size 80: a ragged K for o_proj's 32-wide steps
    _, res, nw, wgu, wd = _inputs(m, hidden, inter, device, seed=3)
    g = torch.Generator().manual_seed(4)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(torch.bfloat16).to(device)

    attn, wo, wq = rand(m, q_size), rand(hidden, q_size, scale=q_size**-0.5), rand(n_qkv, hidden, scale=hidden**-0.5)
    nw2 = (1 + rand(hidden, scale=0.1).float()).to(torch.bfloat16)
    plan = BlockPlan(Config(32, 32, 2, 4, 2), Config(32, 32, 2, 4, 2), 7, o=Config(32, 32, 3, 4, 2),
                     qkv=Config(32, 64, 1, 4, 2))
    nxt = NextLayer(nw2, 1e-5, wq) if with_next else None
    b = layer_block(attn, wo, res, nw, 1e-6, wgu, wd, nxt, plan, intermediates=True)
    assert torch.equal(b["y"], linear(attn, wo, None, plan.o))
    h_ref, res_ref = add_rms_norm(b["y"], res, nw, 1e-6)
    assert torch.equal(b["res"], res_ref)
    torch.testing.assert_close(b["h"], h_ref, atol=0, rtol=2**-7)
    assert torch.equal(b["act"], silu_mul(linear(b["h"], wgu, None, plan.gate_up)))
    assert torch.equal(b["out"], linear(b["act"], wd, None, plan.down))
    if with_next:
        h2_ref, res2_ref = add_rms_norm(b["out"], b["res"], nw2, 1e-5)
        assert torch.equal(b["res2"], res2_ref)
        torch.testing.assert_close(b["h2"], h2_ref, atol=0, rtol=2**-7)
        assert torch.equal(b["qkv"], linear(b["h2"], wq, None, plan.qkv))
        qkv, res2 = layer_block(attn, wo, res, nw, 1e-6, wgu, wd, nxt, plan)
        assert torch.equal(qkv, b["qkv"]) and torch.equal(res2, b["res2"])
    else:
        assert "qkv" not in b
    _, state = workspace(res.device, 0, 0)
    assert not state.any()


def test_engine_switch_is_opt_in_and_cuda_only(monkeypatch):
    """SPARROW_LAYER_BLOCK (read by the decoder): off by default, a bad value named, and only CUDA decode batches."""
    from sparrow_sgl.engine import fused

    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    monkeypatch.delenv(fused.LAYER_BLOCK_ENV, raising=False)
    assert fused.layer_block_mode(x) == "0"
    monkeypatch.setenv(fused.LAYER_BLOCK_ENV, "persistent")
    with pytest.raises(ValueError, match="SPARROW_LAYER_BLOCK='persistent'"):
        fused.layer_block_mode(x)
    for mode in ("mlp", "chain"):
        monkeypatch.setenv(fused.LAYER_BLOCK_ENV, mode)
        assert fused.layer_block_mode(x) == "0"  # CPU tensors: the torch chain
        if torch.cuda.is_available():
            with torch.no_grad():
                assert fused.layer_block_mode(x.cuda()) == mode
                assert fused.layer_block_mode(x.cuda().repeat(17, 1)) == "0"  # 68 rows: a prefill, the kernels
                assert fused.layer_block_mode(x.cuda().float()) == "0"


@pytest.mark.gpu
def test_engine_decode_with_the_block(tiny_model_dir, monkeypatch):
    """bf16 tiny Qwen3 through the CUDA-graph decode with SPARROW_LAYER_BLOCK=mlp / chain: the block was captured,
    and every greedy token is the default model's argmax up to 0.02 nats (norm sums in another order), its decode
    log-probs the teacher-forced ones (prefill: > 64 rows, the separate kernels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engine_helpers import make_engine, random_prompts

    from sparrow_sgl.attention.kernels import triton_mlp_block as mb
    from sparrow_sgl.engine import SamplingParams, fused

    launches = []
    real = mb._launch
    monkeypatch.setattr(mb, "_launch", lambda *a, **k: launches.append(k.get("attn") is not None) or real(*a, **k))
    prompts = random_prompts([30, 52, 9, 70], seed=5)
    params = SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True)
    for mode in ("mlp", "chain"):
        monkeypatch.setenv(fused.LAYER_BLOCK_ENV, mode)
        launches.clear()
        engine = make_engine(tiny_model_dir, device="cuda", dtype="bfloat16", page_size=16, num_kv_pages=256)
        got = engine.generate(prompts, params, schedule="dense", progress=False)
        assert launches and all(launches) == (mode == "chain")
        monkeypatch.setenv(fused.LAYER_BLOCK_ENV, "0")
        scores = engine.score(prompts, [r.token_ids for r in got], return_full=True)
        for rollout, score in zip(got, scores):
            lp = score.full_logprobs
            chosen = lp.gather(1, torch.tensor(rollout.token_ids)[:, None])[:, 0]
            assert (lp.max(-1).values - chosen).max() <= 0.02, mode
            torch.testing.assert_close(torch.tensor(rollout.logprobs), score.logprobs, atol=5e-2, rtol=0)
