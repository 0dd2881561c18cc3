"""The bf16 prefilter (`triton_prefilter`): scoring the bf16 centroid copy with error bounds and rescoring the
undecided pages from the float32 sums selects exactly what the float32 scoring launch selects. GPU (`-m gpu`) and
the CPU Triton interpreter (SPARROW_TRITON_INTERPRET=1), as tests/test_kernels_gpu.py."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gpu import _kernel_test, make_problem

from sparrow_sgl.attention import PageSummaries
from sparrow_sgl.config import SparsityConfig

SEQ = (1, 17, 300, 1000, 64, 2100)
BUDGETS = ([1, 2, 7, 33, 100, 40], [3] * 6, [200] * 6, [16, 5, 20, 60, 4, 130])


def _summaries(device: str, shift: float, kv_heads: int = 2, head_dim: int = 64):
    """A problem whose keys share a common direction of size `shift` (it widens the scores' error bounds), with
    runs of identical pages (equal scores: ties) in the longest request."""
    cfg = SparsityConfig(kv_layout="HND")
    q, k, _, block_table, seq_lens = make_problem("HND", seq=SEQ, q_heads=4 * kv_heads, kv_heads=kv_heads,
                                                  head_dim=head_dim, device=device)
    k = k + shift * torch.randn(head_dim, generator=torch.Generator().manual_seed(1)).to(device)
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    row = block_table[5].long()
    summaries.key_sum[row[11:30]] = summaries.key_sum[row[10]].clone()
    summaries.count[row[11:30]] = summaries.count[row[10]].clone()
    return cfg, q, block_table, seq_lens, summaries


def _csr(limit: torch.Tensor, seq_lens: torch.Tensor, kv_heads: int):
    counts = torch.minimum(limit.long(), (seq_lens.long() + 15) // 16).repeat_interleave(kv_heads)
    row_start = (torch.cumsum(counts, 0) - counts).int()
    return (torch.full((int(counts.sum()) + 1,), -7, dtype=torch.int32, device=limit.device), row_start,
            torch.zeros_like(row_start))


@_kernel_test
@pytest.mark.parametrize("shift,small", [(0.0, 256), (3.0, 256), (3.0, 4)])
def test_prefilter_selects_what_the_float32_sums_select(device, shift, small, monkeypatch):
    from sparrow_sgl.attention.kernels import triton_prefilter
    from sparrow_sgl.attention.kernels.triton_select import select_pages_into

    monkeypatch.setattr(triton_prefilter, "SMALL_ROW", small)  # 4: the rescored pages' search over the whole row
    cfg, q, block_table, seq_lens, summaries = _summaries(device, shift)
    batch, kv_heads, width = len(SEQ), summaries.key_sum.shape[1], block_table.shape[1]
    centroids = summaries.centroid().to(torch.bfloat16)
    rescored = torch.zeros(batch * kv_heads * 256, dtype=torch.int32, device=device)
    for budget in BUDGETS:
        limit = torch.tensor(budget, dtype=torch.int32, device=device)
        out = []
        for prefilter in (False, True):
            pages = torch.full((batch, kv_heads, 160), -5, dtype=torch.int32, device=device)
            scores = torch.full((batch, kv_heads, width), float("nan"), device=device)
            csr = _csr(limit, seq_lens, kv_heads)
            if prefilter:
                bounds = torch.full_like(scores, float("nan"))
                triton_prefilter.select_pages_prefiltered(
                    q, block_table, seq_lens, limit, cfg, pages, key_sum=summaries.key_sum, count=summaries.count,
                    centroids=centroids, scores=scores, bounds=bounds, rescored=rescored, csr=csr)
            else:
                select_pages_into(q, block_table, seq_lens, limit, cfg, pages, key_sum=summaries.key_sum,
                                  count=summaries.count, scores=scores, csr=csr, one_launch=False, all_heads=True)
            out.append((pages, csr))
        (want, want_csr), (got, got_csr) = out
        assert torch.equal(got, want), f"budget {budget}: another selection"
        for a, b in zip(got_csr, want_csr):
            assert torch.equal(a, b), f"budget {budget}: another FlashInfer page list"


@_kernel_test
def test_prefilter_bounds_hold_the_float32_scores(device):
    from sparrow_sgl.attention.kernels.triton_score_heads import score_pages_all_heads

    cfg, q, block_table, seq_lens, summaries = _summaries(device, shift=3.0)
    batch, kv_heads, width = len(SEQ), summaries.key_sum.shape[1], block_table.shape[1]
    scores, bounds = (torch.full((batch, kv_heads, width), float("nan"), device=device) for _ in range(2))
    score_pages_all_heads(q, block_table, seq_lens, summaries.centroid().to(torch.bfloat16), None, scores,
                          page_size=16, sink_pages=1, local_pages=2, bounds=bounds)
    pages = block_table.long().clamp(min=0)
    exact = torch.einsum("bhd,bphd->bhp", q.double().view(batch, kv_heads, 4, -1).mean(2),
                         summaries.centroid(pages).double())
    n_pages = (seq_lens.long() + 15) // 16
    idx = torch.arange(width, device=device)[None, :]
    free = ((idx >= 1) & (idx < n_pages[:, None] - 2))[:, None, :].expand(-1, kv_heads, -1)
    gap = (exact - scores.double()).abs()[free]
    assert (gap <= bounds.double()[free]).all()
    assert float((gap / bounds.double()[free]).max()) > 0.05, "the bound is far looser than the rounding it covers"
    forced = ((idx < 1) | (idx >= n_pages[:, None] - 2)) & (idx < n_pages[:, None])
    forced = forced[:, None, :].expand(-1, kv_heads, -1)
    assert torch.isinf(scores[forced]).all() and (bounds[forced] == 0).all()


def test_prefilter_switch_is_validated(monkeypatch):
    from sparrow_sgl.engine.cuda_graph import PREFILTER_ENV, keeps_centroid_copy, use_prefilter

    monkeypatch.delenv(PREFILTER_ENV, raising=False)
    assert not use_prefilter()
    monkeypatch.setenv(PREFILTER_ENV, "1")
    assert use_prefilter()
    assert keeps_centroid_copy(SparsityConfig()) and not keeps_centroid_copy(SparsityConfig(scorer="quest"))
    monkeypatch.setenv(PREFILTER_ENV, "yes")
    with pytest.raises(ValueError, match=PREFILTER_ENV):
        use_prefilter()
