"""Centroid page selection that reads bf16 centroids and still selects exactly what the float32 centroids select.

Page scoring reads every page's summaries each step, so its bytes grow with the context; the engine's float32 key
sums cost twice the bytes of a bf16 centroid copy, and simply scoring the copy is another policy ("centroid-bf16":
0.15-1% of tokens see another selection). Here the copy only narrows the choice:

1. the all-heads scoring launch scores the bf16 copy, and writes beside each score a bound on how far the float32
   centroid's score can be (`triton_centroid.BF16_SCORE_BOUND` times sum_d |q_d| |c_d|);
2. one program per (request, KV head) finds t, the k-th largest approximate score (the usual search). With E the
   row's largest bound, a page whose score + bound < t - E cannot be among the top k (k pages score >= t - E), and
   a page whose score - bound > t + E must be (every page that could beat it scores > t: there are at most k). Only
   the pages in between (typically a few percent) are rescored from the float32 sums, with the float32 path's
   arithmetic; the k pages are then the sink/local pages, the sure ones, and the best rescored ones (lowest page
   index first among equal scores), as the float32 top-k takes them.

So the scorer stays "centroid" (the policy calibration measured): same selection as the float32 launches, up to the
float32 rounding of a score that every two float32 kernels summing in another order share. The cost is the bf16
copy (1/32 of the KV bytes at page 16), kept by the KV-append kernels as for "centroid-bf16".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels.triton_score_heads import score_pages_all_heads
from sparrow_sgl.attention.kernels.triton_select import (
    _emit_row,
    _key_value,
    _kth_largest_key,
    _order_key,
    topk_bits,
    topk_early_exit,
    topk_warps,
)
from sparrow_sgl.config import SparsityConfig

SMALL_ROW = 256  # rescored pages searched in a compact block up to this many; more: a search over the whole row
RESCORE_CHUNK = 32  # pages rescored per iteration (a [32, head_dim] float32 tile)


@triton.jit
def _prefilter_topk_kernel(
    scores_ptr, bounds_ptr, stride_sb, stride_sh,
    rescored_ptr,
    q_ptr, stride_qb, stride_qh,
    sum_ptr, stride_kp, stride_kh, count_ptr,
    seq_lens_ptr, budget_pages_ptr,
    block_table_ptr, stride_btb,
    pages_ptr, stride_pb, stride_ph, k_cols,
    csr_ptr, row_start_ptr, last_len_ptr,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    SINK: tl.constexpr, LOCAL: tl.constexpr, BLOCK_N: tl.constexpr, SMALL: tl.constexpr, CHUNK: tl.constexpr,
    WRITE_CSR: tl.constexpr, BITS: tl.constexpr, EARLY_EXIT: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // KV_HEADS
    h = row % KV_HEADS
    seq = tl.load(seq_lens_ptr + b).to(tl.int32)
    n_pages = (seq + PAGE - 1) // PAGE
    k = tl.minimum(tl.load(budget_pages_ptr + b).to(tl.int32), n_pages)
    idx = tl.arange(0, BLOCK_N)
    exists = idx < n_pages
    score_row = scores_ptr + b * stride_sb + h * stride_sh
    score = tl.load(score_row + idx, mask=exists, other=0.0)
    key = tl.where(exists, _order_key(score), 0)
    thresh = tl.zeros([], tl.uint32)  # k >= n_pages: every page
    if k < n_pages:
        t = _key_value(_kth_largest_key(key, exists, k, BITS, EARLY_EXIT))
        bound = tl.load(bounds_ptr + b * stride_sb + h * stride_sh + idx, mask=exists, other=0.0)
        forced = exists & ((idx < SINK) | (idx >= n_pages - LOCAL))
        free = exists & ~forced
        reach = tl.max(tl.where(free, bound, 0.0), 0)
        sure = free & (score - bound > t + reach)
        open_ = free & ~sure & (score + bound >= t - reach)
        n_open = tl.sum(open_.to(tl.int32), 0)
        k_open = k - tl.sum((forced | sure).to(tl.int32), 0)
        listed = rescored_ptr + row * BLOCK_N
        tl.store(listed + tl.cumsum(open_.to(tl.int32), 0) - 1, idx, mask=open_)
        tl.debug_barrier()  # the list and the rescored values are read back by other threads of this program
        d = tl.arange(0, HEAD_DIM)
        q_mean = tl.zeros([HEAD_DIM], tl.float32)
        for gi in tl.static_range(GROUP):  # the all-heads launch's order of additions
            q_mean += tl.load(q_ptr + b * stride_qb + (h * GROUP + gi) * stride_qh + d).to(tl.float32)
        q_mean = q_mean / GROUP
        bt_row = block_table_ptr + b * stride_btb
        for c in range(0, n_open, CHUNK):
            j = c + tl.arange(0, CHUNK)
            valid = j < n_open
            page = tl.load(listed + j, mask=valid, other=0)
            phys = tl.load(bt_row + page, mask=valid, other=0).to(tl.int64)
            ksum = tl.load(sum_ptr + phys[:, None] * stride_kp + h * stride_kh + d[None, :], mask=valid[:, None],
                           other=0.0)
            count = tl.load(count_ptr + phys, mask=valid, other=1)
            exact = tl.sum(ksum * q_mean[None, :], 1) / tl.maximum(count, 1).to(tl.float32)
            tl.store(score_row + page, exact, mask=valid)
        tl.debug_barrier()
        rescored = tl.load(score_row + idx, mask=open_, other=0.0, cache_modifier=".cg")
        open_key = tl.where(open_, _order_key(rescored), 0)
        taken = tl.full([BLOCK_N], 0xFFFFFFFF, tl.uint32)  # the key of pages taken whatever the rescoring finds
        thresh = tl.full([], 0xFFFFFFFF, tl.uint32)  # k_open <= 0: the k sink/local pages of lowest index
        if k_open > 0:
            if n_open <= SMALL:
                slot = tl.arange(0, SMALL)
                in_list = slot < n_open
                listed_page = tl.load(listed + slot, mask=in_list, other=0)
                value = tl.load(score_row + listed_page, mask=in_list, other=0.0, cache_modifier=".cg")
                thresh = _kth_largest_key(tl.where(in_list, _order_key(value), 0), in_list, k_open, BITS, EARLY_EXIT)
            else:
                thresh = _kth_largest_key(open_key, open_, k_open, BITS, EARLY_EXIT)
        key = tl.where(forced | sure, taken, open_key)
    _emit_row(key, exists, thresh, k, idx, n_pages, seq, row, h,
              pages_ptr + b * stride_pb + h * stride_ph, k_cols, block_table_ptr + b * stride_btb,
              csr_ptr, row_start_ptr, last_len_ptr, KV_HEADS, PAGE, BLOCK_N, WRITE_CSR)


def select_pages_prefiltered(
    q: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    budget_pages: torch.Tensor,
    cfg: SparsityConfig,
    pages_out: torch.Tensor,
    *,
    key_sum: torch.Tensor,
    count: torch.Tensor,
    centroids: torch.Tensor,
    scores: torch.Tensor,
    bounds: torch.Tensor,
    rescored: torch.Tensor,
    csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`triton_select.select_pages_into` for the centroid scorer (two launches, all KV heads per scoring program),
    reading the bf16 centroid copy `centroids` [pages, kv_heads, D] and rescoring undecided pages from the float32
    `key_sum` and `count`. scores / bounds: float32 [batch, kv_heads, width] (same strides); rescored: int32 with
    >= batch * kv_heads * next_power_of_2(width) entries. Graph-capturable, no allocation. Returns scores (for the
    rescored pages their float32 scores, for the others the approximate ones)."""
    batch, q_heads, head_dim = q.shape
    kv_heads, width = key_sum.shape[1], block_table.shape[1]
    block_n = max(triton.next_power_of_2(width), 16)
    if cfg.scorer != "centroid":
        raise ValueError(f"the bf16 prefilter selects for the 'centroid' scorer, not {cfg.scorer!r}")
    if centroids.shape != key_sum.shape or centroids.dtype != torch.bfloat16 or key_sum.dtype != torch.float32:
        raise ValueError(f"centroids must be a bf16 copy shaped like the float32 key sums {tuple(key_sum.shape)}, got "
                         f"{centroids.dtype} {tuple(centroids.shape)}")
    if key_sum.stride(2) != 1 or pages_out.dtype != torch.int32 or pages_out.shape[:2] != (batch, kv_heads):
        raise ValueError("key_sum needs a contiguous last dim and pages_out int32 [batch, kv_heads, K]")
    if rescored.dtype != torch.int32 or rescored.numel() < batch * kv_heads * block_n:
        raise ValueError(f"rescored must be int32 with >= {batch * kv_heads * block_n} entries")
    score_pages_all_heads(q, block_table, seq_lens, centroids, None, scores, page_size=cfg.page_size,
                          sink_pages=cfg.sink_pages, local_pages=cfg.local_pages, bounds=bounds)
    indices, row_start, last_len = csr if csr is not None else (pages_out, pages_out, pages_out)
    group = q_heads // kv_heads
    _prefilter_topk_kernel[(batch * kv_heads,)](
        scores, bounds, scores.stride(0), scores.stride(1),
        rescored,
        q, q.stride(0), q.stride(1),
        key_sum, key_sum.stride(0), key_sum.stride(1), count,
        seq_lens, budget_pages,
        block_table, block_table.stride(0),
        pages_out, pages_out.stride(0), pages_out.stride(1), pages_out.shape[2],
        indices, row_start, last_len,
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, PAGE=cfg.page_size, SINK=cfg.sink_pages,
        LOCAL=cfg.local_pages, BLOCK_N=block_n, SMALL=min(SMALL_ROW, block_n), CHUNK=RESCORE_CHUNK,
        WRITE_CSR=csr is not None, BITS=topk_bits(block_n), EARLY_EXIT=topk_early_exit(),
        num_warps=topk_warps(block_n),
    )
    return scores
