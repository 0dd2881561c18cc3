"""The sparse attention block (`triton_attention_block.py`: scoring, top-k, split decode and merge in one persistent
launch) against the launches it replaces (`select_pages_into` two-launch + `triton_attend_pages`): the same pages
and the same output, bit for bit. CPU through Triton's interpreter (float32: its bf16 dot is GPU-only), `-m gpu` in
bf16 too."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICES, needs_triton  # first: sets the interpreter flag before a kernel module imports

pytestmark = needs_triton


def _case(device: str, dtype: torch.dtype, seq_lens: list[int], budgets: list[int], kv_heads: int = 2,
          group: int = 2, head_dim: int = 16, page: int = 16, seed: int = 0):
    from sparrow_sgl.attention import PageSummaries
    from sparrow_sgl.config import SparsityConfig

    g = torch.Generator().manual_seed(seed)
    cfg = SparsityConfig(page_size=page, kv_layout="HND", sink_pages=1, local_pages=1)
    batch, width = len(seq_lens), max(-(-s // page) for s in seq_lens)
    k = torch.randn(batch * width, kv_heads, page, head_dim, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(batch * width, kv_heads, page, head_dim, generator=g).to(device=device, dtype=dtype)
    perm = torch.randperm(batch * width, generator=g)  # pages of a request scattered over the pool
    block_table = perm.view(batch, width).to(device=device, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=g).to(device=device, dtype=dtype)
    summaries = PageSummaries.from_cache(k, block_table, lens, cfg)
    budget = torch.tensor(budgets, dtype=torch.int32, device=device)
    n_pages = (lens + page - 1) // page
    counts = torch.minimum(budget, n_pages)[:, None].expand(batch, kv_heads).to(torch.int32)
    return cfg, q, k, v, block_table, lens, summaries, budget, counts, width


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("programs", [1, 5, 64])
@pytest.mark.parametrize("k_cols,budgets", [(8, [3, 4, 5, 2]), (4, [3, 4, 2, 1])])  # 2 decode splits + merges; 1 split
@pytest.mark.parametrize("score_tile", ["", "2x2x4"])  # one scoring chunk per row; four (the top-k waits for them)
def test_block_equals_select_then_attend(device, programs, k_cols, budgets, score_tile, monkeypatch):
    from sparrow_sgl.attention.kernels import triton_decode, triton_select
    from sparrow_sgl.attention.kernels.triton_attention_block import attention_block
    from sparrow_sgl.attention.kernels.triton_linear import workspace
    from sparrow_sgl.attention.kernels.triton_select import select_pages_into

    monkeypatch.setenv(triton_select.SCORE_TILE_ENV, score_tile)
    cfg, q, k, v, block_table, lens, summaries, budget, counts, width = _case(
        device, torch.float32, [100, 37, 128, 16], budgets)
    pages_ref = torch.zeros(len(lens), 2, k_cols, dtype=torch.int32, device=device)
    scores = torch.empty(len(lens), 2, width, dtype=torch.float32, device=device)
    counters = torch.zeros(len(lens) * 2, dtype=torch.int32, device=device)
    select_pages_into(q, block_table, lens, budget, cfg, pages_ref, key_sum=summaries.key_sum, count=summaries.count,
                      scores=scores, counters=counters, one_launch=False)
    out_ref = triton_decode.triton_attend_pages(q, k, v, block_table, lens, pages_ref, counts, cfg)
    pages = torch.full_like(pages_ref, -7)
    out = attention_block(q, k, v, block_table, lens, budget, counts, cfg, summaries.key_sum, pages,
                          torch.empty_like(scores), count=summaries.count, programs=programs)
    assert torch.equal(pages, pages_ref)
    assert torch.equal(out, out_ref)
    _, state = workspace(q.device, 0, 0)
    assert not state.any(), "queue and flags must be left at zero for the next launch"
    again = attention_block(q, k, v, block_table, lens, budget, counts, cfg, summaries.key_sum, pages,
                            torch.empty_like(scores), count=summaries.count, programs=programs)
    assert torch.equal(again, out)


def test_bad_inputs_are_named():
    from sparrow_sgl.attention.kernels.triton_attention_block import attention_block
    from sparrow_sgl.config import SparsityConfig

    cfg, q, k, v, block_table, lens, summaries, budget, counts, width = _case("cpu", torch.float32, [40, 20], [2, 2])
    pages = torch.zeros(2, 2, 4, dtype=torch.int32)
    scores = torch.empty(2, 2, width)
    with pytest.raises(ValueError, match="scores centroids"):
        attention_block(q, k, v, block_table, lens, budget, counts, SparsityConfig(kv_layout="HND", scorer="quest"),
                        summaries.key_sum, pages, scores)
    with pytest.raises(ValueError, match="pages_out must be int32"):
        attention_block(q, k, v, block_table, lens, budget, counts, cfg, summaries.key_sum, pages.long(), scores)
    with pytest.raises(ValueError, match="scores must be float32"):
        attention_block(q, k, v, block_table, lens, budget, counts, cfg, summaries.key_sum, pages, scores[:, :, :1])


@pytest.mark.gpu
def test_model_shape_in_a_graph():
    """A Qwen3-4B-shaped sparse layer (25 requests of 0.3-4K tokens, 8 KV heads, group 4, bf16): the block's pages and
    output equal the separate launches', and a captured graph replays the same bits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from sparrow_sgl.attention.kernels import triton_decode
    from sparrow_sgl.attention.kernels.triton_attention_block import attention_block
    from sparrow_sgl.attention.kernels.triton_select import select_pages_into

    lens = [300 + 151 * i for i in range(25)]
    cfg, q, k, v, block_table, seq, summaries, budget, counts, width = _case(
        "cuda", torch.bfloat16, lens, [64] * 25, kv_heads=8, group=4, head_dim=128, seed=3)
    centroid = (summaries.key_sum / summaries.count.clamp(min=1)[:, None, None]).to(torch.bfloat16)
    pages_ref = torch.zeros(25, 8, 64, dtype=torch.int32, device="cuda")
    scores = torch.empty(25, 8, width, dtype=torch.float32, device="cuda")
    select_pages_into(q, block_table, seq, budget, cfg, pages_ref, key_sum=centroid, scores=scores,
                      counters=torch.zeros(200, dtype=torch.int32, device="cuda"), one_launch=False)
    out_ref = triton_decode.triton_attend_pages(q, k, v, block_table, seq, pages_ref, counts, cfg)
    pages = torch.zeros_like(pages_ref)
    first = attention_block(q, k, v, block_table, seq, budget, counts, cfg, centroid, pages, torch.empty_like(scores))
    assert torch.equal(pages, pages_ref) and torch.equal(first, out_ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_block(q, k, v, block_table, seq, budget, counts, cfg, centroid, pages, torch.empty_like(scores))
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)


@pytest.mark.gpu
def test_engine_rollouts_unchanged(tiny_model_dir, monkeypatch):
    """The engine's sparse CUDA-graph decode with SPARROW_ATTN_BLOCK=1 samples the same tokens with the same
    log-probs as with the separate launches (the same arithmetic), and the block was captured."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engine_helpers import make_engine, random_prompts

    from sparrow_sgl.attention.kernels import triton_attention_block as tab
    from sparrow_sgl.engine import SamplingParams
    from sparrow_sgl.engine.cuda_graph import ATTN_BLOCK_ENV

    calls = []
    real = tab.attention_block
    monkeypatch.setattr(tab, "attention_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = random_prompts([30, 52, 9, 70], seed=5)
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=48, ignore_eos=True)
    rollouts = {}
    for on in ("0", "1"):
        monkeypatch.setenv(ATTN_BLOCK_ENV, on)
        engine = make_engine(tiny_model_dir, device="cuda", dtype="bfloat16", page_size=16, num_kv_pages=256)
        rollouts[on] = engine.generate(prompts, params, schedule="fixed:32", progress=False)
    assert calls
    for a, b in zip(rollouts["0"], rollouts["1"]):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_switch_is_named(monkeypatch):
    from sparrow_sgl.engine.cuda_graph import ATTN_BLOCK_ENV, attention_block_on

    monkeypatch.delenv(ATTN_BLOCK_ENV, raising=False)
    assert not attention_block_on()
    monkeypatch.setenv(ATTN_BLOCK_ENV, "1")
    assert attention_block_on()
    monkeypatch.setenv(ATTN_BLOCK_ENV, "yes")
    with pytest.raises(ValueError, match="SPARROW_ATTN_BLOCK='yes'"):
        attention_block_on()
