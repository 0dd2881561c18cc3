"""Block-sparse decode attention core: equality with dense attention, selection rules, summaries."""

from __future__ import annotations

import math

import pytest
import torch

from sparrow_sgl.attention import PageSummaries, score_pages, select_pages, sparse_decode
from sparrow_sgl.config import ConfigError, SparsityConfig


def make_paged(seq_lens, kv_heads, head_dim, page_size, layout="NHD", seed=0, dtype=torch.float32):
    """Random paged caches with shuffled physical pages; also returns the contiguous K/V per request."""
    g = torch.Generator().manual_seed(seed)
    pages_per = [math.ceil(n / page_size) for n in seq_lens]
    total = sum(pages_per) + 3  # a few unused pages
    perm = torch.randperm(total, generator=g)
    table = torch.full((len(seq_lens), max(pages_per)), -1, dtype=torch.long)
    shape = (total, page_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g, dtype=dtype)
    v_cache = torch.randn(shape, generator=g, dtype=dtype)
    i = 0
    contiguous = []
    for b, n in enumerate(seq_lens):
        table[b, : pages_per[b]] = perm[i : i + pages_per[b]]
        i += pages_per[b]
        k = k_cache[table[b, : pages_per[b]]].reshape(-1, kv_heads, head_dim)[:n]
        v = v_cache[table[b, : pages_per[b]]].reshape(-1, kv_heads, head_dim)[:n]
        contiguous.append((k, v))
    if layout == "HND":
        k_cache, v_cache = k_cache.permute(0, 2, 1, 3).contiguous(), v_cache.permute(0, 2, 1, 3).contiguous()
    return k_cache, v_cache, table, torch.tensor(seq_lens), contiguous


def dense_reference(q, contiguous):
    outs = []
    for b, (k, v) in enumerate(contiguous):
        groups = q.shape[1] // k.shape[1]
        kk = k.float().repeat_interleave(groups, 1).transpose(0, 1)  # [H, n, D]
        vv = v.float().repeat_interleave(groups, 1).transpose(0, 1)
        att = torch.softmax(q[b].float()[:, None, :] @ kk.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        outs.append((att @ vv)[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_sparse_equals_dense_when_budget_covers_sequence(page_size, gqa, layout):
    kv_heads, head_dim = 2, 16
    seq_lens = [1, 37, 200, 129][: 4 if page_size < 64 else 3]
    k_cache, v_cache, table, lens, contiguous = make_paged(seq_lens, kv_heads, head_dim, page_size, layout, seed=gqa)
    q = torch.randn(len(seq_lens), kv_heads * gqa, head_dim)
    cfg = SparsityConfig(page_size=page_size, kv_layout=layout)
    ref = dense_reference(q, contiguous)
    big = max(seq_lens) + page_size  # budget >= every length
    budget = math.ceil(big / page_size) * page_size
    for b in (budget, None, [budget] * len(seq_lens), torch.full((len(seq_lens),), budget)):
        torch.testing.assert_close(sparse_decode(q, k_cache, v_cache, table, lens, b, cfg), ref, atol=1e-5, rtol=1e-5)


def test_dense_layers_ignore_budget():
    k_cache, v_cache, table, lens, contiguous = make_paged([300], 2, 8, 16)
    q = torch.randn(1, 4, 8)
    cfg = SparsityConfig(dense_layers=(0, 1))
    ref = dense_reference(q, contiguous)
    dense_layer = sparse_decode(q, k_cache, v_cache, table, lens, 64, cfg, layer=1)
    torch.testing.assert_close(dense_layer, ref, atol=1e-5, rtol=0)
    sparse = sparse_decode(q, k_cache, v_cache, table, lens, 64, cfg, layer=2)
    assert not torch.allclose(sparse, ref, atol=1e-4)


def test_planted_page_always_selected_and_reserved_pages_kept():
    page_size, kv_heads, head_dim = 16, 2, 16
    seq_lens = [640, 333]
    k_cache, v_cache, table, lens, _ = make_paged(seq_lens, kv_heads, head_dim, page_size, seed=3)
    k_cache *= 0.01
    q = torch.randn(2, 4, head_dim)
    planted = [17, 9]  # logical pages in the middle of each sequence
    for b, page in enumerate(planted):
        for h in range(kv_heads):
            group_q = q[b, h * 2 : (h + 1) * 2].mean(0)
            k_cache[table[b, page], :, h] = 10.0 * group_q / group_q.norm()
    cfg = SparsityConfig(page_size=page_size)
    for scorer in ("centroid", "quest"):
        cfg = SparsityConfig(page_size=page_size, scorer=scorer)
        summaries = PageSummaries.from_cache(k_cache, table, lens, cfg)
        for budget in (64, 128, 256):
            sel = select_pages(q, summaries, table, lens, budget, cfg)
            attended = sel.attended_tokens(lens, page_size)
            assert bool((attended <= budget).all()), "attended tokens exceed the budget"
            for b in range(2):
                n_pages = math.ceil(seq_lens[b] / page_size)
                for h in range(kv_heads):
                    chosen = set(sel.pages[b, h][sel.valid[b, h]].tolist())
                    assert len(chosen) == budget // page_size
                    assert planted[b] in chosen, f"{scorer}: planted page not selected"
                    assert 0 in chosen, "sink page dropped"
                    assert {n_pages - 1, n_pages - 2} <= chosen, "local pages dropped"


def test_bf16_centroid_scorer_scores_the_rounded_centroid():
    """"centroid-bf16" = the group's mean query dotted with bf16(float32 sum / count); it can reorder pages."""
    torch.manual_seed(0)
    cfg = SparsityConfig(page_size=4, scorer="centroid-bf16")
    k_cache = torch.randn(12, 4, 2, 32)
    table, lens = torch.arange(12).view(2, 6), torch.tensor([23, 17])
    summaries = PageSummaries.from_cache(k_cache, table, lens, cfg)
    q = torch.randn(2, 4, 32)
    got = score_pages(q, summaries, table, cfg)
    centroids = summaries.centroid(table.long()).to(torch.bfloat16).float()  # [batch, pages, kv_heads, dim]
    want = torch.einsum("bhd,bphd->bhp", q.view(2, 2, 2, 32).mean(2), centroids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    fp32 = score_pages(q, summaries, table, SparsityConfig(page_size=4))
    assert 0 < float((fp32 - got).abs().max()) < 0.05


def test_unknown_scorer_names_the_choices():
    with pytest.raises(ConfigError, match="centroid-bf16"):
        SparsityConfig(scorer="centroid_bf16")


def test_budget_differs_per_request():
    k_cache, v_cache, table, lens, _ = make_paged([512, 512], 2, 8, 16, seed=5)
    q = torch.randn(2, 2, 8)
    cfg = SparsityConfig()
    summaries = PageSummaries.from_cache(k_cache, table, lens, cfg)
    sel = select_pages(q, summaries, table, lens, [64, None], cfg)
    assert sel.valid[0].sum(-1).tolist() == [4, 4]
    assert sel.valid[1].sum(-1).tolist() == [32, 32]


def test_incremental_summaries_equal_a_full_scan():
    page_size, kv_heads, head_dim = 4, 2, 8
    k_cache, _, table, lens, contiguous = make_paged([23, 10], kv_heads, head_dim, page_size, seed=7)
    cfg = SparsityConfig(page_size=page_size)
    reference = PageSummaries.from_cache(k_cache, table, lens, cfg)
    incremental = PageSummaries.allocate(k_cache.shape[0], kv_heads, head_dim)
    incremental.key_min[:] = 5.0  # stale contents of a recycled pool must not leak into fresh pages
    for b, (k, _) in enumerate(contiguous):
        for t in range(k.shape[0]):  # one token at a time, as decode appends
            page = table[b, t // page_size].view(1)
            incremental.append(page, torch.tensor([t % page_size]), k[t : t + 1])
    used = table[table >= 0]
    for name in ("key_sum", "key_min", "key_max"):
        torch.testing.assert_close(getattr(incremental, name)[used], getattr(reference, name)[used])
    assert incremental.count[used].tolist() == reference.count[used].tolist()
    torch.testing.assert_close(incremental.centroid()[used], reference.centroid()[used])


def test_bf16_cache_is_handled():
    k_cache, v_cache, table, lens, contiguous = make_paged([100], 2, 16, 16, dtype=torch.bfloat16)
    q = torch.randn(1, 4, 16, dtype=torch.bfloat16)
    out = sparse_decode(q, k_cache, v_cache, table, lens, None, SparsityConfig())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_reference(q, contiguous), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(q=torch.randn(2, 4)), "q must be"),
        (dict(q=torch.randn(1, 3, 8)), "multiple of KV heads"),
        (dict(seq_lens=torch.tensor([0])), "at least one token"),
        (dict(block_table=torch.zeros(2, 4, dtype=torch.long)), "block_table"),
    ],
)
def test_bad_shapes_raise_clear_errors(bad, message):
    k_cache, v_cache, table, lens, _ = make_paged([30], 2, 8, 16)
    args = dict(q=torch.randn(1, 4, 8), block_table=table, seq_lens=lens)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        sparse_decode(args["q"], k_cache, v_cache, args["block_table"], args["seq_lens"], 32, SparsityConfig())
