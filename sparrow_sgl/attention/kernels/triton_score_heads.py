"""Centroid page scoring with one program per (request, page chunk) over every KV head: the CUDA-graph engine's
scoring launch (`SPARROW_SCORE_HEADS=0` goes back to `triton_select`'s per-head launch).

The scoring launch of `triton_select` runs one program per (request, KV head, page chunk), so each program reads
one head's 256-byte slice of a page's summaries and the block-table entry again for every head. Here a program
scores all KV heads of its pages at once: the summaries of a page ([kv_heads, head_dim], contiguous) are one read,
the block table is read once per page. Same scores as `_score_pages_kernel` for the centroid scorer (key sums
divided by the count, or bf16 centroids as they are), sink and local pages forced to +inf, pages past a request's
length left unwritten, written into the same [batch, kv_heads, width] buffer the top-k launch reads.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels.triton_centroid import bf16_centroid

HEADS_ENV = "SPARROW_SCORE_HEADS"
PAGES_ENV = "SPARROW_SCORE_HEADS_PAGES"  # pages per program of the all-heads launch (a power of two, 8-512)
# 8: on an H200 (session 14) scoring the engine's float32 key sums this way at 16 pages per program made sparse
# rollouts 1.4 / 2.5 / 1.9% faster (Qwen3 1.7B / 4B / 8B, 0.86 presets) than the per-head launch; once steps were
# sized by the pages reached (session 15), 8 pages per program was faster than 16 at nearly every context
# (20-60 us a step, +0.4-0.5% rollouts)
DEFAULT_PAGES = 8


def use_all_heads() -> bool:
    """The all-heads scoring launch (default), read when a step is built or captured (SPARROW_SCORE_HEADS=0: the
    per-head launch)."""
    text = os.environ.get(HEADS_ENV, "").strip() or "1"
    if text not in ("0", "1"):
        raise ValueError(f"{HEADS_ENV}={text!r}: choose 1 (all KV heads per program) or 0 (one head per program)")
    return text == "1"


def all_heads_pages() -> int:
    """Pages per program of the all-heads launch: `SPARROW_SCORE_HEADS_PAGES` (default 8). A graph sized for long
    contexts gives a short batch one program per request at 128 pages (32 programs at 2K: 5-8% slower steps on an
    H200, NOTES.md phase 5); fewer pages per program keep short rows spread over the GPU."""
    text = os.environ.get(PAGES_ENV, "").strip() or str(DEFAULT_PAGES)
    if not text.isdigit() or not 8 <= int(text) <= 512 or int(text) & (int(text) - 1):
        raise ValueError(f"{PAGES_ENV}={text!r}: expected a power of two from 8 to 512")
    return int(text)


@triton.jit
def _score_heads_kernel(
    q_ptr, stride_qb, stride_qh,
    sum_ptr, stride_sp, stride_sh,
    count_ptr,
    block_table_ptr, stride_btb,
    seq_lens_ptr,
    scores_ptr, stride_ob, stride_oh,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    SINK: tl.constexpr, LOCAL: tl.constexpr, BLOCK_P: tl.constexpr, PAGES_PER_PROG: tl.constexpr,
    DIVIDE: tl.constexpr, ROUND: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.program_id(1) * PAGES_PER_PROG
    seq = tl.load(seq_lens_ptr + b).to(tl.int32)
    n_pages = (seq + PAGE - 1) // PAGE
    if start < n_pages:
        h = tl.arange(0, KV_HEADS)
        d = tl.arange(0, HEAD_DIM)
        q_mean = tl.zeros([KV_HEADS, HEAD_DIM], tl.float32)
        for gi in tl.static_range(GROUP):
            q_rows = q_ptr + b * stride_qb + (h * GROUP + gi)[:, None] * stride_qh + d[None, :]
            q_mean += tl.load(q_rows).to(tl.float32)
        q_mean = q_mean / GROUP
        bt_row = block_table_ptr + b * stride_btb
        for p0 in range(0, PAGES_PER_PROG, BLOCK_P):
            idx = start + p0 + tl.arange(0, BLOCK_P)
            exists = idx < n_pages
            phys = tl.load(bt_row + idx, mask=exists, other=0).to(tl.int64)
            offs = phys[:, None, None] * stride_sp + h[None, :, None] * stride_sh + d[None, None, :]
            summary = tl.load(sum_ptr + offs, mask=exists[:, None, None], other=0.0).to(tl.float32)
            if ROUND:  # centroid-bf16 from the sums (triton_centroid)
                count = tl.load(count_ptr + phys, mask=exists, other=1)
                summary = bf16_centroid(summary, tl.maximum(count, 1).to(tl.float32)[:, None, None])
            score = tl.sum(summary * q_mean[None, :, :], 2)  # [BLOCK_P, KV_HEADS]
            if DIVIDE and not ROUND:
                count = tl.load(count_ptr + phys, mask=exists, other=1)
                score = score / tl.maximum(count, 1).to(tl.float32)[:, None]
            forced = (idx < SINK) | (idx >= n_pages - LOCAL)
            score = tl.where(forced[:, None], float("inf"), score)
            dst = scores_ptr + b * stride_ob + h[None, :] * stride_oh + idx[:, None]
            tl.store(dst, score, mask=exists[:, None])


def score_pages_all_heads(
    q: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    key_sum: torch.Tensor,
    count: torch.Tensor | None,
    scores: torch.Tensor,
    *,
    page_size: int,
    sink_pages: int,
    local_pages: int,
    pages_per_prog: int | None = None,
    block_p: int = 8,
    num_warps: int = 4,
    bf16: bool = False,
) -> torch.Tensor:
    """Centroid scores of every page into scores [batch, kv_heads, width] (graph-capturable, no allocation).

    key_sum: [pages, kv_heads, D] float32 sums (count given) or centroids in any float dtype (count None);
    bf16: the centroid-bf16 scorer (sums given: each centroid rounded to bf16 before scoring);
    pages_per_prog None: `all_heads_pages()`."""
    batch, q_heads, head_dim = q.shape
    kv_heads = key_sum.shape[1]
    if q_heads % kv_heads or key_sum.shape[2] != head_dim or key_sum.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError(f"summaries {tuple(key_sum.shape)} (last dim contiguous) do not fit q {tuple(q.shape)}")
    if kv_heads & (kv_heads - 1) or head_dim & (head_dim - 1):
        raise ValueError(f"kv_heads ({kv_heads}) and head_dim ({head_dim}) must be powers of two")
    if scores.shape[:2] != (batch, kv_heads) or scores.shape[2] < block_table.shape[1] or scores.stride(2) != 1:
        raise ValueError(f"scores must be [{batch}, {kv_heads}, >= {block_table.shape[1]}], got {tuple(scores.shape)}")
    width = block_table.shape[1]
    pages_per_prog = min(pages_per_prog or all_heads_pages(), max(triton.next_power_of_2(width), 16))
    block_p = min(block_p, pages_per_prog)
    _score_heads_kernel[(batch, triton.cdiv(width, pages_per_prog))](
        q, q.stride(0), q.stride(1),
        key_sum, key_sum.stride(0), key_sum.stride(1),
        count if count is not None else seq_lens,
        block_table, block_table.stride(0),
        seq_lens,
        scores, scores.stride(0), scores.stride(1),
        KV_HEADS=kv_heads, GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, PAGE=page_size, SINK=sink_pages,
        LOCAL=local_pages, BLOCK_P=block_p, PAGES_PER_PROG=pages_per_prog, DIVIDE=count is not None,
        ROUND=bf16 and count is not None,
        num_warps=num_warps,
    )
    return scores
