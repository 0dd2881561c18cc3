"""Decode-step page-summary update in one Triton launch (the torch `PageSummaries.append` takes ~8 launches and a
host sync for the fresh-page reset); `append_kv_decode` fuses the KV append itself into the same launch.

One program per appended token updates its page's running key sum, min and max for every KV head, and the page's
token count; a token at offset 0 restarts the page. Decode only: at most one appended token per page per call
(each request appends to its own last page), which makes the read-modify-write race-free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels.triton_centroid import page_mean, store_centroid
from sparrow_sgl.attention.pages import PageSummaries


@triton.jit
def _append_decode_kernel(
    keys_ptr, stride_kn, stride_kh,
    pages_ptr, offsets_ptr,
    sum_ptr, min_ptr, max_ptr, stride_sp, stride_sh,
    count_ptr,
    KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, MINMAX: tl.constexpr,
):
    n = tl.program_id(0)
    page = tl.load(pages_ptr + n).to(tl.int64)
    fresh = tl.load(offsets_ptr + n) == 0
    hh = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (hh < KV_HEADS)[:, None]
    key = tl.load(keys_ptr + n * stride_kn + hh[:, None] * stride_kh + d[None, :], mask=mask).to(tl.float32)
    offs = page * stride_sp + hh[:, None] * stride_sh + d[None, :]
    old_sum = tl.load(sum_ptr + offs, mask=mask)
    tl.store(sum_ptr + offs, tl.where(fresh, key, old_sum + key), mask=mask)
    if MINMAX:
        old_min = tl.load(min_ptr + offs, mask=mask)
        old_max = tl.load(max_ptr + offs, mask=mask)
        tl.store(min_ptr + offs, tl.where(fresh, key, tl.minimum(old_min, key)), mask=mask)
        tl.store(max_ptr + offs, tl.where(fresh, key, tl.maximum(old_max, key)), mask=mask)
    old_count = tl.load(count_ptr + page)
    tl.store(count_ptr + page, tl.where(fresh, 1, old_count + 1))


def _check_pages_and_summaries(summaries, pages: torch.Tensor, offsets: torch.Tensor, n: int, head_dim: int,
                               minmax: bool) -> None:
    """Contract shared by both append kernels: [n] page/offset lists, float32 summaries, min/max when asked."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the Triton kernel, got {head_dim}")
    if pages.shape != (n,) or offsets.shape != (n,):
        raise ValueError(f"pages and offsets must be [{n}], got {tuple(pages.shape)} and {tuple(offsets.shape)}")
    if minmax and not summaries.has_minmax:
        raise ValueError("minmax=True needs summaries with key_min/key_max (allocated with minmax=True)")
    s = summaries
    same_strides = not minmax or s.key_sum.stride() == s.key_min.stride() == s.key_max.stride()
    if s.key_sum.dtype != torch.float32 or not same_strides:
        raise ValueError("summary tensors must be float32 (min/max with the sum's strides)")


def append_decode(
    summaries: PageSummaries, pages: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, minmax: bool = True
) -> None:
    """Same result as `summaries.append(pages, offsets, keys)` when no two keys share a page (one decode step).

    minmax=False skips the Quest min/max (a centroid-only engine reads and writes 3x fewer summary bytes).
    """
    n = keys.shape[0]
    kv_heads, head_dim = summaries.key_sum.shape[1:]
    if keys.dim() != 3 or keys.shape[1:] != (kv_heads, head_dim) or keys.stride(2) != 1:
        raise ValueError(f"keys must be [N, {kv_heads}, {head_dim}] (last dim contiguous), got {tuple(keys.shape)}")
    _check_pages_and_summaries(summaries, pages, offsets, n, head_dim, minmax)
    s = summaries
    if n == 0:
        return
    _append_decode_kernel[(n,)](
        keys, keys.stride(0), keys.stride(1),
        pages, offsets,
        s.key_sum, s.key_min if minmax else s.key_sum, s.key_max if minmax else s.key_sum,
        s.key_sum.stride(0), s.key_sum.stride(1),
        s.count,
        KV_HEADS=kv_heads, BLOCK_H=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim, MINMAX=minmax,
    )


@triton.jit
def _append_kv_decode_kernel(
    keys_ptr, values_ptr, stride_kn, stride_kh, stride_vn, stride_vh,
    pages_ptr, offsets_ptr,
    k_cache_ptr, v_cache_ptr, stride_cp, stride_ch, stride_ct,
    sum_ptr, min_ptr, max_ptr, stride_sp, stride_sh,
    count_ptr,
    centroid_ptr, stride_ep, stride_eh,
    KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, MINMAX: tl.constexpr,
    CENTROID: tl.constexpr,
):
    n = tl.program_id(0)
    page = tl.load(pages_ptr + n).to(tl.int64)
    offset = tl.load(offsets_ptr + n).to(tl.int64)
    live = page >= 0  # padding rows of a captured batch carry page -1 and write nothing
    fresh = offset == 0
    hh = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (hh < KV_HEADS)[:, None] & live
    key = tl.load(keys_ptr + n * stride_kn + hh[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
    value = tl.load(values_ptr + n * stride_vn + hh[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
    slot = page * stride_cp + hh[:, None] * stride_ch + offset * stride_ct + d[None, :]
    tl.store(k_cache_ptr + slot, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot, value.to(v_cache_ptr.dtype.element_ty), mask=mask)
    key = key.to(tl.float32)
    offs = page * stride_sp + hh[:, None] * stride_sh + d[None, :]
    old_sum = tl.load(sum_ptr + offs, mask=mask, other=0.0)
    new_sum = tl.where(fresh, key, old_sum + key)
    tl.store(sum_ptr + offs, new_sum, mask=mask)
    if MINMAX:
        old_min = tl.load(min_ptr + offs, mask=mask, other=0.0)
        old_max = tl.load(max_ptr + offs, mask=mask, other=0.0)
        tl.store(min_ptr + offs, tl.where(fresh, key, tl.minimum(old_min, key)), mask=mask)
        tl.store(max_ptr + offs, tl.where(fresh, key, tl.maximum(old_max, key)), mask=mask)
    old_count = tl.load(count_ptr + page, mask=live, other=0)
    new_count = tl.where(fresh, 1, old_count + 1)
    tl.store(count_ptr + page, new_count, mask=live)
    if CENTROID:
        dst = centroid_ptr + page * stride_ep + hh[:, None] * stride_eh + d[None, :]
        store_centroid(dst, page_mean(new_sum, new_count.to(tl.float32)), mask)


def check_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, summaries: PageSummaries, pages: torch.Tensor,
                       offsets: torch.Tensor, n: int, minmax: bool, centroid: torch.Tensor | None) -> None:
    """Contract of a decode KV append of n rows into an HND cache and its summaries (shared with
    `triton_qkv_append.py`)."""
    kv_heads, head_dim = summaries.key_sum.shape[1:]
    if k_cache.dim() != 4 or k_cache.shape[1] != kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must be HND [pages, {kv_heads}, page, {head_dim}], got {tuple(k_cache.shape)}")
    if v_cache.stride() != k_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache must share strides with a contiguous head_dim")
    _check_pages_and_summaries(summaries, pages, offsets, n, head_dim, minmax)
    shape = summaries.key_sum.shape
    if centroid is not None and (centroid.shape != shape or centroid.stride(2) != 1):
        raise ValueError(f"centroid must be {tuple(shape)} with a contiguous last dim")


def append_kv_decode(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    summaries: PageSummaries,
    pages: torch.Tensor,
    offsets: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    minmax: bool = True,
    centroid: torch.Tensor | None = None,
) -> None:
    """One decode step's KV append and page-summary update in one launch (graph-capturable, no host sync).

    k_cache/v_cache: HND [pages, kv_heads, page_size, head_dim]; keys/values [N, kv_heads, head_dim] land at
    (pages[N], offsets[N]); a page < 0 skips its row (padding). At most one row per page (decode). `centroid`
    [pages, kv_heads, head_dim] (e.g. bf16), when given, receives the updated page mean: a half-size copy of the
    centroids for the scorer to read instead of the float32 sums.
    """
    n = keys.shape[0]
    kv_heads, head_dim = summaries.key_sum.shape[1:]
    for name, t in (("keys", keys), ("values", values)):
        if t.dim() != 3 or t.shape != (n, kv_heads, head_dim) or t.stride(2) != 1:
            raise ValueError(f"{name} must be [{n}, {kv_heads}, {head_dim}] (last dim contiguous), "
                             f"got {tuple(t.shape)}")
    check_cache_append(k_cache, v_cache, summaries, pages, offsets, n, minmax, centroid)
    s = summaries
    if n == 0:
        return
    cent = centroid if centroid is not None else s.key_sum
    _append_kv_decode_kernel[(n,)](
        keys, values, keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        pages, offsets,
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        s.key_sum, s.key_min if minmax else s.key_sum, s.key_max if minmax else s.key_sum,
        s.key_sum.stride(0), s.key_sum.stride(1),
        s.count,
        cent, cent.stride(0), cent.stride(1),
        KV_HEADS=kv_heads, BLOCK_H=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim, MINMAX=minmax,
        CENTROID=centroid is not None,
    )
