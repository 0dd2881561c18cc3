"""A sparse layer's decode attention in one persistent launch: page scoring, top-k, the split decode and the merge
(four launches in the engine today), an experiment of issue 19 beside `triton_mlp_block.py` (the same work
queue, `triton_queue.py`).

The sparse-only excess of a decode step is mostly latency: the top-k costs 8-10 us a layer at every context length
and sits between two launch boundaries, scoring and the merge are a few microseconds of work each. Here one grid
takes work items from an atomic queue in order, row (request x KV head) by row: the row's scoring chunks, then its
top-k (waits for those chunks); after every row's selection items, per row its decode splits (each waits for the
row's top-k) and its merge (waits for the splits). So a row's top-k runs while later rows still score, and its
decode starts while later rows still select. An item waits only for earlier items, which running programs hold: any
grid size is deadlock-free.

Same arithmetic as the launches it replaces: scoring is `triton_select._score_range`, the top-k
`triton_select._topk_row` (the one-launch radix select: the same pages as the two-launch search, ties to the lower
page index), the decode `triton_decode._decode_split` and the merge `triton_decode._merge_row`, on the same split plan,
so pages and output equal `select_pages_into` + `triton_attend_pages` bit for bit. Centroid scorer, Triton decode
(no FlashInfer page list). Queue and flags live in `triton_linear.workspace`'s counters (zero between launches; the
last program to leave resets them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels.triton_decode import (
    _decode_split,
    _merge_row,
    _num_sms,
    decode_pipeline,
    decode_tiling,
    plan_splits,
)
from sparrow_sgl.attention.kernels.triton_linear import workspace
from sparrow_sgl.attention.kernels.triton_queue import signal, wait_count
from sparrow_sgl.attention.kernels.triton_select import TOPK_CHUNK, _score_range, _topk_row, score_tiling
from sparrow_sgl.attention.pages import to_hnd
from sparrow_sgl.config import SparsityConfig

SLOTS = 2  # queue, programs that left; then per row: chunks scored, top-k done, splits done
# The kernel compiles to 255 registers for sm_90a (Triton 3.6; the decode kernel alone: 128), 2 programs per SM; capped
# at 128 it spills 172 bytes (mostly the top-k's path) and keeps the decode kernel's 4 per SM (`bench/kernel_aot.py`)
MAX_REGISTERS = 128


@triton.jit
def _attention_block_kernel(
    q_ptr, stride_qb, stride_qh,
    k_ptr, v_ptr, stride_kp, stride_kh, stride_kt,
    sum_ptr, stride_sp, stride_sh, count_ptr,
    block_table_ptr, stride_btb, seq_lens_ptr, budget_pages_ptr,
    scores_ptr, stride_sb, stride_sr,
    pages_ptr, stride_pb, stride_ph, k_cols, counts_ptr, stride_cb, stride_ch,
    part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, scale,
    state_ptr, rows, chunks, n_programs,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, SCORE_G: tl.constexpr, DECODE_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr, SCORE_P: tl.constexpr,
    PAGES_PER_PROG: tl.constexpr, DIVIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr, PREFETCH: tl.constexpr,
):
    queue = state_ptr
    left = state_ptr + 1
    scored = state_ptr + 2
    selected = scored + rows
    split_done = selected + rows
    select_items = chunks + 1  # per row: its scoring chunks, then its top-k
    attend_items = SPLITS + 1 if SPLITS > 1 else 1  # per row: its splits, then its merge
    end_select = rows * select_items
    n_items = end_select + rows * attend_items
    item = tl.atomic_add(queue, 1, sem="relaxed")
    while item < n_items:
        if item < end_select:
            row = item // select_items
            part = item % select_items
            b = row // KV_HEADS
            h = row % KV_HEADS
            seq = tl.load(seq_lens_ptr + b).to(tl.int32)
            n_pages = (seq + PAGE - 1) // PAGE
            bt_row = block_table_ptr + b * stride_btb
            score_row = scores_ptr + b * stride_sb + h * stride_sr
            if part < chunks:
                start = part * PAGES_PER_PROG
                if start < n_pages:
                    _score_range(q_ptr, stride_qb, stride_qh, sum_ptr, sum_ptr, sum_ptr, stride_sp, stride_sh,
                                 count_ptr, bt_row, score_row, b, h, start, n_pages, GROUP, SCORE_G, HEAD_DIM, SINK,
                                 LOCAL, SCORE_P, PAGES_PER_PROG, False, DIVIDE)
                signal(scored + row)
            else:
                wait_count(scored + row, chunks)
                k = tl.minimum(tl.load(budget_pages_ptr + b).to(tl.int32), n_pages)
                _topk_row(score_row, n_pages, k, seq, pages_ptr + b * stride_pb + h * stride_ph, k_cols, bt_row,
                          pages_ptr, pages_ptr, row, h, KV_HEADS, PAGE, BLOCK_N, False)
                signal(selected + row)
        else:
            row = (item - end_select) // attend_items
            part = (item - end_select) % attend_items
            if part < SPLITS:
                wait_count(selected + row, 1)
                _decode_split(q_ptr, stride_qb, stride_qh, k_ptr, v_ptr, stride_kp, stride_kh, stride_kt,
                              block_table_ptr, stride_btb, seq_lens_ptr, pages_ptr, stride_pb, stride_ph, counts_ptr,
                              stride_cb, stride_ch, part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, scale,
                              row, part, KV_HEADS, GROUP, DECODE_G, HEAD_DIM, PAGE, BLOCK_P, SPLITS, PRECISION,
                              PREFETCH, True)
                signal(split_done + row)
            else:
                wait_count(split_done + row, SPLITS)
                for g in tl.static_range(GROUP):  # the row's query heads
                    _merge_row(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh,
                               (row // KV_HEADS) * KV_HEADS * GROUP + (row % KV_HEADS) * GROUP + g,
                               KV_HEADS * GROUP, HEAD_DIM, SPLITS, BLOCK_S, True)
        item = tl.atomic_add(queue, 1, sem="relaxed")
    if tl.atomic_add(left, 1, sem="acq_rel") == n_programs - 1:  # the last to leave: reset for the next launch
        tl.store(queue, 0)
        tl.store(left, 0)
        for f0 in range(0, 3 * rows, 1024):
            idx = f0 + tl.arange(0, 1024)
            tl.store(scored + idx, tl.zeros([1024], tl.int32), mask=idx < 3 * rows)


def attention_block(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    budget_pages: torch.Tensor,
    counts: torch.Tensor,
    cfg: SparsityConfig,
    key_sum: torch.Tensor,
    pages_out: torch.Tensor,
    scores: torch.Tensor,
    *,
    count: torch.Tensor | None = None,
    scale: float | None = None,
    programs: int | None = None,
    maxnreg: int | None = MAX_REGISTERS,
) -> torch.Tensor:
    """Sparse decode attention of q [batch, q_heads, D] in one launch: scores every page of each (request, KV head)
    from `key_sum` [pages, kv_heads, D] (centroids, or key sums divided by `count` [pages]), writes the selected
    logical pages to pages_out [batch, kv_heads, K] (as `select_pages_into`; budget_pages [batch] pages per request)
    and attends over the first counts[b, h] of them (as `triton_attend_pages`). scores: float32 [batch, kv_heads,
    max_pages]. programs: the grid (default 4 per SM, the decode kernel's occupancy); maxnreg: the register cap
    (None: the compiler's choice). Returns the output [batch, q_heads, D]."""
    batch, q_heads, head_dim = q.shape
    k_hnd, v_hnd = to_hnd(k_cache, cfg), to_hnd(v_cache, cfg)
    kv_heads = k_hnd.shape[1]
    rows, max_pages = batch * kv_heads, block_table.shape[1]
    if cfg.scorer != "centroid" or key_sum.shape[1:] != (kv_heads, head_dim) or key_sum.stride(2) != 1:
        raise ValueError(f"the attention block scores centroids [pages, {kv_heads}, {head_dim}] (contiguous last "
                         f"dim), got scorer {cfg.scorer!r} and {tuple(key_sum.shape)}")
    if q_heads % kv_heads or head_dim & (head_dim - 1) or k_hnd.stride() != v_hnd.stride():
        raise ValueError(f"q {tuple(q.shape)} and the cache {tuple(k_hnd.shape)} do not fit the Triton kernels")
    if pages_out.shape[:2] != (batch, kv_heads) or pages_out.dtype != torch.int32 or pages_out.stride(2) != 1:
        raise ValueError(f"pages_out must be int32 [{batch}, {kv_heads}, K], got {tuple(pages_out.shape)}")
    if scores.shape != (batch, kv_heads, max_pages) or scores.dtype != torch.float32 or scores.stride(2) != 1:
        raise ValueError(f"scores must be float32 [{batch}, {kv_heads}, {max_pages}], got {tuple(scores.shape)}")
    group = q_heads // kv_heads
    ppp, score_p, _ = score_tiling(rows, max_pages, q.device)
    waves, block_p = decode_tiling(cfg.page_size)
    stages, prefetch, warps = decode_pipeline()
    splits, _ = plan_splits(rows, pages_out.shape[2], block_p, _num_sms(q.device), waves)
    out = torch.empty_like(q)
    part_out = torch.empty(batch * q_heads * splits if splits > 1 else 1, head_dim, dtype=torch.float32,
                           device=q.device)
    part_lse = torch.empty(part_out.shape[0], dtype=torch.float32, device=q.device)
    _, state = workspace(q.device, 0, SLOTS + 3 * rows)
    programs = programs or 4 * _num_sms(q.device)
    caps = {"maxnreg": maxnreg} if maxnreg and q.is_cuda else {}
    head_stride = (lambda t: t.stride(1) if t.shape[1] > 1 else 0)
    _attention_block_kernel[(programs,)](
        q, q.stride(0), q.stride(1),
        k_hnd, v_hnd, k_hnd.stride(0), k_hnd.stride(1), k_hnd.stride(2),
        key_sum, key_sum.stride(0), key_sum.stride(1), count if count is not None else seq_lens,
        block_table, block_table.stride(0), seq_lens, budget_pages,
        scores, scores.stride(0), scores.stride(1),
        pages_out, pages_out.stride(0), pages_out.stride(1), pages_out.shape[2], counts, counts.stride(0),
        head_stride(counts),
        part_out, part_lse, out, out.stride(0), out.stride(1), head_dim**-0.5 if scale is None else scale,
        state, rows, triton.cdiv(max_pages, ppp), programs,
        KV_HEADS=kv_heads, GROUP=group, SCORE_G=triton.next_power_of_2(group),
        DECODE_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE=cfg.page_size, SINK=cfg.sink_pages,
        LOCAL=cfg.local_pages, SCORE_P=score_p, PAGES_PER_PROG=ppp, DIVIDE=count is not None,
        BLOCK_N=min(max(triton.next_power_of_2(max_pages), 16), TOPK_CHUNK), BLOCK_P=block_p, SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PREFETCH=prefetch, num_warps=warps, num_stages=stages, **caps,
    )
    return out
