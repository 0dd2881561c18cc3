"""Fused page selection in Triton: score every page once, then an exact per-row top-k in ascending page order.

Two launches per decode step, both graph-capturable (no host sync when the caller passes the buffers):
1. `_score_pages_kernel`, grid (batch * kv_heads, page chunks): reads each page summary of each (request, KV head)
   exactly once (centroid: key_sum + count; quest: key_min + key_max) and writes one float score per page, with the
   sink and local pages forced to +inf. Many programs per row so the summary read runs at memory bandwidth.
2. `_topk_pages_kernel`, grid (batch * kv_heads,): loads a row's scores (4 bytes per page, ~1% of the summary
   bytes), finds the k-th largest by a 32-step bitwise search on order-preserving integer keys, keeps the pages
   above it plus the lowest-index ties, and writes them compacted in ascending order — no sort. It can also write
   FlashInfer's ragged page list (physical page * kv_heads + head, see `flashinfer_decode`) and the last-page
   length of each row, so attention reads the selection without any torch glue in between.

Same contract as `sparrow_sgl.attention.select.select_pages` (selection identical up to ties of equal scores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.pages import PageSummaries
from sparrow_sgl.attention.select import Selection, budget_pages_tensor
from sparrow_sgl.config import SparsityConfig

MAX_PAGES_PER_ROW = 32768  # top-k holds a whole row in one program


@triton.jit
def _score_pages_kernel(
    q_ptr, stride_qb, stride_qh,
    sum_ptr, min_ptr, max_ptr, stride_sp, stride_sh,
    count_ptr,
    block_table_ptr, stride_btb,
    seq_lens_ptr,
    scores_ptr, stride_ob, stride_oh,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr,
    BLOCK_P: tl.constexpr, PAGES_PER_PROG: tl.constexpr, QUEST: tl.constexpr, DIVIDE: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // KV_HEADS
    h = row % KV_HEADS
    start = tl.program_id(1) * PAGES_PER_PROG
    seq = tl.load(seq_lens_ptr + b).to(tl.int32)
    n_pages = (seq + PAGE - 1) // PAGE
    if start < n_pages:
        d = tl.arange(0, HEAD_DIM)
        g = tl.arange(0, BLOCK_G)
        q_rows = q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :]
        q = tl.load(q_rows, mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)  # [BLOCK_G, D]
        q_mean = tl.sum(q, 0) / GROUP
        for p0 in range(0, PAGES_PER_PROG, BLOCK_P):
            idx = start + p0 + tl.arange(0, BLOCK_P)
            exists = idx < n_pages
            phys = tl.load(block_table_ptr + b * stride_btb + idx, mask=exists, other=0).to(tl.int64)
            offs = phys[:, None] * stride_sp + h * stride_sh + d[None, :]
            if QUEST:
                kmin = tl.load(min_ptr + offs, mask=exists[:, None], other=0.0).to(tl.float32)
                kmax = tl.load(max_ptr + offs, mask=exists[:, None], other=0.0).to(tl.float32)
                score = tl.full([BLOCK_P], float("-inf"), tl.float32)
                for gi in tl.static_range(GROUP):
                    qg = tl.sum(tl.where((g == gi)[:, None], q, 0.0), 0)[None, :]  # row gi of q, [1, D]
                    upper = tl.sum(tl.maximum(qg * kmin, qg * kmax), 1)
                    score = tl.maximum(score, upper)
            else:
                ksum = tl.load(sum_ptr + offs, mask=exists[:, None], other=0.0).to(tl.float32)
                score = tl.sum(ksum * q_mean[None, :], 1)
                if DIVIDE:
                    count = tl.load(count_ptr + phys, mask=exists, other=1)
                    score = score / tl.maximum(count, 1).to(tl.float32)
            forced = (idx < SINK) | (idx >= n_pages - LOCAL)
            score = tl.where(forced, float("inf"), score)
            tl.store(scores_ptr + b * stride_ob + h * stride_oh + idx, score, mask=exists)


@triton.jit
def _topk_pages_kernel(
    scores_ptr, stride_sb, stride_sh,
    seq_lens_ptr, budget_pages_ptr,
    block_table_ptr, stride_btb,
    pages_ptr, stride_pb, stride_ph, k_cols,
    csr_ptr, row_start_ptr, last_len_ptr,
    KV_HEADS: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_CSR: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // KV_HEADS
    h = row % KV_HEADS
    seq = tl.load(seq_lens_ptr + b).to(tl.int32)
    n_pages = (seq + PAGE - 1) // PAGE
    k = tl.minimum(tl.load(budget_pages_ptr + b).to(tl.int32), n_pages)
    idx = tl.arange(0, BLOCK_N)
    exists = idx < n_pages
    score = tl.load(scores_ptr + b * stride_sb + h * stride_sh + idx, mask=exists, other=0.0)
    # Order-preserving map float -> uint32: flip all bits of negatives, the sign bit of the rest.
    bits = score.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    key = tl.where(exists, key, 0)
    # Largest threshold t with count(key >= t) >= k, built from the top bit down: t is the k-th largest key.
    thresh = tl.zeros([], tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        cand = thresh | (tl.full([], 1, tl.uint32) << bit)
        n_ge = tl.sum((key >= cand).to(tl.int32), 0)
        thresh = tl.where(n_ge >= k, cand, thresh)
    greater = exists & (key > thresh)
    ties = exists & (key == thresh)
    tie_rank = tl.cumsum(ties.to(tl.int32), 0) - 1
    need = k - tl.sum(greater.to(tl.int32), 0)
    chosen = greater | (ties & (tie_rank < need))
    pos = tl.cumsum(chosen.to(tl.int32), 0) - 1
    out = pages_ptr + b * stride_pb + h * stride_ph
    tl.store(out + pos, idx, mask=chosen)
    tl.store(out + idx, tl.zeros([BLOCK_N], tl.int32), mask=(idx >= k) & (idx < k_cols))
    if WRITE_CSR:
        start = tl.load(row_start_ptr + row)
        phys = tl.load(block_table_ptr + b * stride_btb + idx, mask=chosen, other=0)
        tl.store(csr_ptr + start + pos, phys * KV_HEADS + h, mask=chosen)
        last_chosen = tl.max(tl.where(chosen, idx, -1), 0)
        last_len = tl.where(last_chosen == n_pages - 1, seq - (n_pages - 1) * PAGE, PAGE)
        tl.store(last_len_ptr + row, last_len)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def select_pages_into(
    q: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    budget_pages: torch.Tensor,
    cfg: SparsityConfig,
    pages_out: torch.Tensor,
    *,
    key_sum: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    key_min: torch.Tensor | None = None,
    key_max: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    pages_per_prog: int | None = None,
    topk: bool = True,
) -> torch.Tensor:
    """Write the selected logical pages of every (request, KV head) into `pages_out` [batch, kv_heads, K] int32.

    Allocation-free and sync-free when `scores` is given, so it can be captured in a CUDA graph.
    budget_pages: [batch] int32 pages per request (clamped to the request's pages here). Row r = b * kv_heads + h
    gets min(budget_pages[b], n_pages[b]) pages in ascending order; the rest of its K entries are set to 0.
    Centroid scorer: `key_sum` [pages, kv_heads, D] (any float dtype) and `count` [pages] (None: key_sum already
    holds centroids). Quest scorer: `key_min` and `key_max`. csr = (indices, row_start [rows], last_len [rows])
    additionally writes FlashInfer's per-(request, KV head) page list: indices[row_start[r] + i] = physical
    page * kv_heads + h of the row's i-th selected page (row_start must be the exclusive cumsum of the row counts).
    Returns the scores buffer [batch, kv_heads, max_pages] (entries past a request's pages are unwritten).
    """
    batch, q_heads, head_dim = q.shape
    quest = cfg.scorer == "quest"
    summary = key_min if quest else key_sum
    if summary is None or (quest and key_max is None):
        raise ValueError(f"scorer {cfg.scorer!r} needs " + ("key_min and key_max" if quest else "key_sum"))
    kv_heads = summary.shape[1]
    max_pages = block_table.shape[1]
    if q_heads % kv_heads or summary.shape[2] != head_dim or summary.stride(2) != 1:
        raise ValueError(f"summaries {tuple(summary.shape)} (last dim contiguous) do not fit q {tuple(q.shape)}")
    if quest and key_max.stride() != key_min.stride():
        raise ValueError("key_min and key_max must share strides")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the Triton kernels, got {head_dim}")
    if max_pages > MAX_PAGES_PER_ROW:
        raise ValueError(f"block table has {max_pages} pages per request; the top-k kernel holds {MAX_PAGES_PER_ROW}")
    if pages_out.shape[:2] != (batch, kv_heads) or pages_out.dtype != torch.int32 or pages_out.stride(2) != 1:
        raise ValueError(f"pages_out must be int32 [{batch}, {kv_heads}, K], got {pages_out.dtype} "
                         f"{tuple(pages_out.shape)}")
    if pages_out.shape[2] > max(triton.next_power_of_2(max_pages), 16):
        raise ValueError(f"pages_out has {pages_out.shape[2]} columns, more than the {max_pages} pages per request")
    if scores is None:
        scores = torch.empty(batch, kv_heads, max_pages, dtype=torch.float32, device=q.device)
    group = q_heads // kv_heads
    rows = batch * kv_heads
    if pages_per_prog is None:  # about 4 programs per SM: latency-bound small batches need the parallelism
        pages_per_prog = min(max(triton.next_power_of_2(rows * max_pages // (4 * _num_sms(q.device))), 32), 256)
    pages_per_prog = min(pages_per_prog, triton.next_power_of_2(max_pages))
    block_p = min(32, pages_per_prog)
    stride_sp, stride_sh = summary.stride(0), summary.stride(1)
    _score_pages_kernel[(rows, triton.cdiv(max_pages, pages_per_prog))](
        q, q.stride(0), q.stride(1),
        key_sum if key_sum is not None else summary, key_min if quest else summary,
        key_max if quest else summary, stride_sp, stride_sh,
        count if count is not None else seq_lens,
        block_table, block_table.stride(0),
        seq_lens,
        scores, scores.stride(0), scores.stride(1),
        KV_HEADS=kv_heads, GROUP=group, BLOCK_G=triton.next_power_of_2(group), HEAD_DIM=head_dim,
        PAGE=cfg.page_size, SINK=cfg.sink_pages, LOCAL=cfg.local_pages,
        BLOCK_P=block_p, PAGES_PER_PROG=pages_per_prog, QUEST=quest, DIVIDE=count is not None,
        num_warps=4,
    )
    if not topk:  # scoring only (benchmarks time the two launches apart)
        return scores
    block_n = max(triton.next_power_of_2(max_pages), 16)
    indices, row_start, last_len = csr if csr is not None else (pages_out, pages_out, pages_out)
    _topk_pages_kernel[(rows,)](
        scores, scores.stride(0), scores.stride(1),
        seq_lens, budget_pages,
        block_table, block_table.stride(0),
        pages_out, pages_out.stride(0), pages_out.stride(1), pages_out.shape[2],
        indices, row_start, last_len,
        KV_HEADS=kv_heads, PAGE=cfg.page_size, BLOCK_N=block_n, WRITE_CSR=csr is not None,
        num_warps=min(16, max(4, block_n // 512)),
    )
    return scores


def triton_select_pages(
    q: torch.Tensor,
    summaries: PageSummaries,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    budget: int | None | list | torch.Tensor,
    cfg: SparsityConfig,
) -> Selection:
    """Drop-in for `select_pages` with summaries given (one host sync to size the output)."""
    seq_lens = seq_lens.to(block_table.device)
    n_pages = (seq_lens.long() + cfg.page_size - 1) // cfg.page_size
    limit = budget_pages_tensor(budget, n_pages, cfg.page_size)
    k = max(int(limit.max()), 1)
    kv_heads = summaries.key_sum.shape[1]
    pages = torch.empty(q.shape[0], kv_heads, k, dtype=torch.int32, device=q.device)
    select_pages_into(
        q, block_table, seq_lens, limit.to(torch.int32), cfg, pages,
        key_sum=summaries.key_sum, count=summaries.count, key_min=summaries.key_min, key_max=summaries.key_max,
    )
    valid = (torch.arange(k, device=q.device)[None, :] < limit[:, None])[:, None, :].expand_as(pages)
    return Selection(pages=pages.long(), valid=valid, n_pages=n_pages)
