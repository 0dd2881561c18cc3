"""One decode step's q/k RMSNorm + rotary, KV append and page-summary update in one Triton launch on the qkv
GEMM output (the CUDA-graph step ran `triton_fused.qk_norm_rope`, then `triton_summaries.append_kv_decode`: two
latency-bound launches per layer at rollout batch sizes).

One program per (token, head), as in `qk_norm_rope`: a query head's program normalises and rotates it into q (the
attention input); a KV head's program normalises and rotates its key, writes it and the value into the paged cache
at (page, offset) and updates the head's page sum (min/max, bf16 centroid). The rotary is `triton_fused`'s own
per-head code at the same launch width and the summary math is `append_kv_decode`'s, so q, the cache and the
summaries are bit-identical to the two launches (the summaries accumulate the rounded, rotated key, as before).

The page's token count is shared by the token's KV heads, and each head's centroid divides by the new count: every
KV-head program reads the old count, and the last of them to arrive (an acq_rel ticket per token, as in
`triton_select`'s one-launch kernel) writes the new one and resets its ticket, so no program reads a count already
bumped and CUDA-graph replays need no memset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels.pdl import launch_options, pdl_enter, pdl_on
from sparrow_sgl.attention.kernels.triton_centroid import page_mean, store_centroid
from sparrow_sgl.attention.kernels.triton_fused import _norm_rope, _norm_rope_head, check_qkv
from sparrow_sgl.attention.kernels.triton_summaries import check_cache_append
from sparrow_sgl.attention.pages import PageSummaries


@triton.jit
def _qkv_append_decode_kernel(
    qkv_ptr, stride_t, qw_ptr, kw_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin, q_ptr, eps, head_dim,
    pages_ptr, offsets_ptr, tickets_ptr,
    k_cache_ptr, v_cache_ptr, stride_cp, stride_ch, stride_ct,
    sum_ptr, min_ptr, max_ptr, stride_sp, stride_sh, count_ptr,
    centroid_ptr, stride_ep, stride_eh,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, MINMAX: tl.constexpr,
    CENTROID: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    src = qkv_ptr + t * stride_t + h * HEAD_DIM  # k heads follow the q heads in a qkv row, v heads the k heads
    cos_row = cos_ptr + t * stride_cos
    sin_row = sin_ptr + t * stride_sin
    if h < HEADS:
        dst = q_ptr + (t * HEADS + h) * HEAD_DIM
        _norm_rope_head(src, qw_ptr, cos_row, sin_row, dst, eps, head_dim, HEAD_DIM, dtype)
    else:
        page = tl.load(pages_ptr + t).to(tl.int64)
        if page >= 0:  # padding rows of a captured batch carry page -1 and write nothing
            kh = h - HEADS
            offset = tl.load(offsets_ptr + t).to(tl.int64)
            fresh = offset == 0
            d = tl.arange(0, HEAD_DIM)
            # every load before the first store, so they overlap (a load is not moved above a store it may alias)
            offs = page * stride_sp + kh * stride_sh + d
            old_count = tl.load(count_ptr + page)  # before this program's ticket: the count is written after it
            old_sum = tl.load(sum_ptr + offs)
            if MINMAX:
                old_min = tl.load(min_ptr + offs)
                old_max = tl.load(max_ptr + offs)
            value = tl.load(src + KV_HEADS * HEAD_DIM + d)
            key = _norm_rope(src, kw_ptr, cos_row, sin_row, eps, head_dim, HEAD_DIM, dtype).to(dtype)
            slot = page * stride_cp + kh * stride_ch + offset * stride_ct + d
            tl.store(k_cache_ptr + slot, key.to(k_cache_ptr.dtype.element_ty))
            tl.store(v_cache_ptr + slot, value.to(v_cache_ptr.dtype.element_ty))
            key = key.to(tl.float32)
            new_sum = tl.where(fresh, key, old_sum + key)
            tl.store(sum_ptr + offs, new_sum)
            if MINMAX:
                tl.store(min_ptr + offs, tl.where(fresh, key, tl.minimum(old_min, key)))
                tl.store(max_ptr + offs, tl.where(fresh, key, tl.maximum(old_max, key)))
            new_count = tl.where(fresh, 1, old_count + 1)
            if CENTROID:
                dst = centroid_ptr + page * stride_ep + kh * stride_eh + d
                store_centroid(dst, page_mean(new_sum, new_count.to(tl.float32)), None)
            tl.debug_barrier()  # every thread's count read precedes the release below
            ticket = tl.atomic_add(tickets_ptr + t, 1, sem="acq_rel")
            if ticket == KV_HEADS - 1:
                tl.store(count_ptr + page, new_count)
                tl.store(tickets_ptr + t, 0)  # ready for the next launch (graph replay)


def qkv_append_decode(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    summaries: PageSummaries,
    pages: torch.Tensor,
    offsets: torch.Tensor,
    *,
    minmax: bool = True,
    centroid: torch.Tensor | None = None,
    tickets: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, heads, D] of qkv [T, (heads + 2 kv_heads) * D] (per-head RMSNorm * weight, then rotary); its K/V land
    in k_cache/v_cache (HND [pages, kv_heads, page_size, D]) at (pages[T], offsets[T]) and in the summaries.

    Equals `qk_norm_rope` followed by `append_kv_decode(..., minmax=minmax, centroid=centroid)` bit for bit: a
    page < 0 skips its row (padding; its q is still computed), at most one row per page (decode). tickets: int32
    [>= T], zero before the first call and left zero (pass a static buffer to capture in a CUDA graph).
    """
    tokens, head_dim = qkv.shape[0], q_weight.shape[0]
    kv_heads = summaries.key_sum.shape[1]
    if summaries.key_sum.shape[2] != head_dim:
        raise ValueError(f"summaries hold head_dim {summaries.key_sum.shape[2]}, the norm weights {head_dim}")
    check_qkv(qkv, q_weight, k_weight, cos, sin, heads, kv_heads)
    check_cache_append(k_cache, v_cache, summaries, pages, offsets, tokens, minmax, centroid)
    if tickets is None:
        tickets = torch.zeros(tokens, dtype=torch.int32, device=qkv.device)
    if tickets.dtype != torch.int32 or tickets.numel() < tokens or not tickets.is_contiguous():
        raise ValueError(f"tickets must be a contiguous int32 tensor of >= {tokens} entries (zeros)")
    q = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    s = summaries
    cent = centroid if centroid is not None else s.key_sum
    pdl = pdl_on(qkv.device)
    _qkv_append_decode_kernel[(tokens, heads + kv_heads)](
        qkv, qkv.stride(0), q_weight, k_weight, cos, sin, cos.stride(0), sin.stride(0), q, eps, head_dim,
        pages, offsets, tickets,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        s.key_sum, s.key_min if minmax else s.key_sum, s.key_max if minmax else s.key_sum,
        s.key_sum.stride(0), s.key_sum.stride(1), s.count,
        cent, cent.stride(0), cent.stride(1),
        HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, MINMAX=minmax, CENTROID=centroid is not None, PDL=pdl,
        num_warps=1 if head_dim <= 128 else 2,  # qk_norm_rope's width: the same reduction order, the same bits
        **launch_options(pdl),
    )
    return q
