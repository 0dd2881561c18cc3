"""Decode-step page-summary update in one Triton launch (the torch `PageSummaries.append` takes ~8 launches and a
host sync for the fresh-page reset).

One program per appended token updates its page's running key sum, min and max for every KV head, and the page's
token count; a token at offset 0 restarts the page. Decode only: at most one appended token per page per call
(each request appends to its own last page), which makes the read-modify-write race-free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the Triton kernel, got {head_dim}")
    if pages.shape != (n,) or offsets.shape != (n,):
        raise ValueError(f"pages and offsets must be [{n}], got {tuple(pages.shape)} and {tuple(offsets.shape)}")
    s = summaries
    if not (s.key_sum.stride() == s.key_min.stride() == s.key_max.stride()) or s.key_sum.dtype != torch.float32:
        raise ValueError("summary tensors must be float32 with equal strides")
    if n == 0:
        return
    _append_decode_kernel[(n,)](
        keys, keys.stride(0), keys.stride(1),
        pages, offsets,
        s.key_sum, s.key_min, s.key_max, s.key_sum.stride(0), s.key_sum.stride(1),
        s.count,
        KV_HEADS=kv_heads, BLOCK_H=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim, MINMAX=minmax,
    )
