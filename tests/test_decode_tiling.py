"""Issue 19's kernel options against the torch reference: the all-heads scoring launch (the engine's default;
SPARROW_SCORE_HEADS=0 opts out) and the decode split / tile settings (SPARROW_DECODE_WAVES, SPARROW_DECODE_BLOCK_PAGES).
GPU (`-m gpu`); the scoring test also on the CPU Triton interpreter with SPARROW_TRITON_INTERPRET=1 (as
tests/test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gpu import (
    _kernel_test,
    assert_same_up_to_ties,
    make_problem,
    reference_scores,
    rel_err,
)
from triton_helpers import needs_triton

from sparrow_sgl.attention import PageSummaries, select_pages
from sparrow_sgl.attention.attend import attend_pages
from sparrow_sgl.attention.select import Selection
from sparrow_sgl.config import SparsityConfig


@_kernel_test
@pytest.mark.parametrize("kv_heads,head_dim,bf16,pages", [(2, 32, False, "128"), (8, 128, False, "16"),
                                                           (8, 128, True, "128"), (8, 128, True, "8")])
def test_all_heads_scoring_selects_like_the_per_head_launch(device, kv_heads, head_dim, bf16, pages, monkeypatch):
    from sparrow_sgl.attention.kernels.triton_score_heads import PAGES_ENV
    from sparrow_sgl.attention.kernels.triton_select import select_pages_into

    monkeypatch.setenv(PAGES_ENV, pages)  # pages per all-heads program: one or many programs per request

    cfg = SparsityConfig(kv_layout="HND")
    seq = (1, 17, 300, 1000, 64, 2100)
    q, k, _, block_table, seq_lens = make_problem("HND", seq=seq, q_heads=4 * kv_heads, kv_heads=kv_heads,
                                                  head_dim=head_dim, device=device)
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    key_sum, count = summaries.key_sum, summaries.count
    if bf16:
        key_sum, count = summaries.centroid().to(torch.bfloat16), None
    limit = torch.tensor([1, 2, 7, 33, 100, 40], dtype=torch.int32, device=device)
    out = {}
    for all_heads in (False, True):
        pages = torch.full((len(seq), kv_heads, 64), -5, dtype=torch.int32, device=device)
        scores = torch.full((len(seq), kv_heads, block_table.shape[1]), float("nan"), device=device)
        select_pages_into(q, block_table, seq_lens, limit, cfg, pages, key_sum=key_sum, count=count, scores=scores,
                          one_launch=False, all_heads=all_heads)
        out[all_heads] = pages, scores
    n_pages = (seq_lens.long() + 15) // 16
    written = (torch.arange(block_table.shape[1], device=device)[None, None, :] < n_pages[:, None, None]).expand(
        -1, kv_heads, -1)
    per_head, heads = out[False][1], out[True][1]
    assert not heads[written].isnan().any(), "a page's score left unwritten"
    torch.testing.assert_close(heads[written], per_head[written], rtol=1e-5, atol=1e-5)
    ref = select_pages(q, summaries, block_table, seq_lens, (limit * 16).tolist(), cfg)
    got = Selection(pages=out[True][0][..., : ref.pages.shape[2]].long(), valid=ref.valid, n_pages=ref.n_pages)
    ref_scores = reference_scores(q, summaries, block_table, seq_lens, cfg)
    assert_same_up_to_ties(got, ref, ref_scores, rtol=1e-2 if bf16 else 1e-4)
    if not bf16:
        assert torch.equal(out[True][0], out[False][0])


@pytest.mark.gpu  # the decode kernel's runtime-bounded loop does not run in the interpreter (nor does the old test)
@pytest.mark.parametrize("waves,block_pages", [(8, 4), (2, 8), (8, 8)])
def test_decode_split_and_tile_settings_match_reference(waves, block_pages, monkeypatch):
    from sparrow_sgl.attention.kernels.triton_decode import BLOCK_ENV, WAVES_ENV, triton_attend_pages

    monkeypatch.setenv(WAVES_ENV, str(waves))
    monkeypatch.setenv(BLOCK_ENV, str(block_pages))
    cfg = SparsityConfig(kv_layout="HND")
    q, k, v, block_table, seq_lens = make_problem("HND", seq=(100, 300, 17, 1000, 64), device="cuda")
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    for budget in ([48, 96, None, 32, 512], None, 48):
        selection = select_pages(q, summaries if budget else None, block_table, seq_lens, budget, cfg)
        ref = attend_pages(q.float(), k.float(), v.float(), block_table, seq_lens, selection, cfg)
        counts = selection.valid.sum(-1).to(torch.int32)
        out = triton_attend_pages(q, k, v, block_table, seq_lens, selection.pages.int(), counts, cfg)
        assert rel_err(out, ref) < 1e-4


@pytest.mark.gpu
def test_decode_pipeline_settings_write_the_same_bits(monkeypatch):
    """SPARROW_DECODE_STAGES (Triton num_stages) and SPARROW_DECODE_PREFETCH (the next chunk's page ids loaded one
    iteration ahead) change the schedule of the loads, not the arithmetic: the outputs are bit-identical.
    SPARROW_DECODE_WARPS=8 matches the reference."""
    from sparrow_sgl.attention.kernels.triton_decode import (
        DECODE_WARPS_ENV,
        PREFETCH_ENV,
        STAGES_ENV,
        triton_attend_pages,
    )

    cfg = SparsityConfig(kv_layout="HND")
    q, k, v, block_table, seq_lens = make_problem("HND", seq=(100, 3000, 17, 1000, 64), q_heads=32, kv_heads=8,
                                                  dtype=torch.bfloat16, device="cuda")
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    selection = select_pages(q, summaries, block_table, seq_lens, [48, 960, None, 320, 512], cfg)
    pages, counts = selection.pages.int(), selection.valid.sum(-1).to(torch.int32)
    ref = attend_pages(q.float(), k.float(), v.float(), block_table, seq_lens, selection, cfg)
    base = triton_attend_pages(q, k, v, block_table, seq_lens, pages, counts, cfg)
    assert rel_err(base, ref) < 2e-2
    for stages in ("1", "2", "3"):
        for prefetch in ("0", "1"):
            monkeypatch.setenv(STAGES_ENV, stages)
            monkeypatch.setenv(PREFETCH_ENV, prefetch)
            assert torch.equal(triton_attend_pages(q, k, v, block_table, seq_lens, pages, counts, cfg), base)
    monkeypatch.setenv(DECODE_WARPS_ENV, "8")  # another thread layout may sum in another order: close, not equal
    assert rel_err(triton_attend_pages(q, k, v, block_table, seq_lens, pages, counts, cfg), ref) < 2e-2


@needs_triton
def test_all_heads_scoring_is_the_engine_default(monkeypatch):
    from sparrow_sgl.attention.kernels.triton_score_heads import HEADS_ENV, PAGES_ENV, all_heads_pages, use_all_heads

    monkeypatch.delenv(HEADS_ENV, raising=False)
    monkeypatch.delenv(PAGES_ENV, raising=False)
    assert use_all_heads() and all_heads_pages() == 8
    monkeypatch.setenv(HEADS_ENV, "0")
    assert not use_all_heads()
    monkeypatch.setenv(HEADS_ENV, "yes")
    with pytest.raises(ValueError, match=HEADS_ENV):
        use_all_heads()


@needs_triton
def test_top_k_programs_run_one_warp_on_narrow_tables(monkeypatch):
    from sparrow_sgl.attention.kernels.triton_select import TOPK_WARPS_ENV, topk_warps

    monkeypatch.delenv(TOPK_WARPS_ENV, raising=False)
    assert [topk_warps(n) for n in (16, 128, 256, 512, 2048, 4096, 8192, 32768)] == [1, 1, 1, 4, 4, 8, 16, 16]
    monkeypatch.setenv(TOPK_WARPS_ENV, "2")
    assert topk_warps(128) == topk_warps(4096) == 2


@needs_triton
@pytest.mark.parametrize("value", ["4", "96", "1024", "many"])
def test_bad_all_heads_pages_is_a_clear_error(monkeypatch, value):
    from sparrow_sgl.attention.kernels.triton_score_heads import PAGES_ENV, all_heads_pages

    monkeypatch.setenv(PAGES_ENV, value)
    with pytest.raises(ValueError, match=PAGES_ENV):
        all_heads_pages()


@needs_triton
@pytest.mark.parametrize("env,value", [("SPARROW_DECODE_STAGES", "0"), ("SPARROW_DECODE_STAGES", "two"),
                                       ("SPARROW_DECODE_PREFETCH", "yes"), ("SPARROW_DECODE_WARPS", "16")])
def test_bad_decode_pipeline_settings_are_clear_errors(monkeypatch, env, value):
    from sparrow_sgl.attention.kernels.triton_decode import decode_pipeline

    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=env):
        decode_pipeline()


@needs_triton
def test_the_split_plan_counts_resident_waves_of_live_rows(monkeypatch):
    """The resident-wave plan at the shapes bench.decode_splits timed on an H200 (132 SMs, 4 programs each): the
    split counts it picks there (NOTES.md, session 17), and SPARROW_DECODE_WAVES restores the earlier rule."""
    from sparrow_sgl.attention.kernels.triton_decode import WAVES_ENV, decode_tiling, plan_splits

    monkeypatch.delenv(WAVES_ENV, raising=False)
    picks = {rows: [plan_splits(rows, pages, 4, 132)[0] for pages in (48, 192, 384, 2048)]
             for rows in (34 * 8, 25 * 8, 24 * 8)}
    assert picks == {272: [1, 3, 7, 9], 200: [2, 2, 5, 5], 192: [2, 2, 5, 8]}
    assert plan_splits(25 * 8, 2048, 4, 132, waves=8)[0] == 6  # the earlier rule: ceil(8 x 132 / 200)
    assert decode_tiling(16) == (None, 4)
    monkeypatch.setenv(WAVES_ENV, "8")
    assert decode_tiling(16) == (8, 4)


@needs_triton
@pytest.mark.parametrize("value", ["0", "four"])
def test_bad_resident_programs_setting_is_a_clear_error(monkeypatch, value):
    from sparrow_sgl.attention.kernels.triton_decode import RESIDENT_ENV, plan_splits

    monkeypatch.setenv(RESIDENT_ENV, value)
    with pytest.raises(ValueError, match=RESIDENT_ENV):
        plan_splits(200, 2048, 4, 132)
