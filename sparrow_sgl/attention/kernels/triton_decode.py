"""Paged block-sparse decode attention in Triton: the default decode kernel (dense layers included).

Split-KV (flash-decoding): grid (batch * kv_heads, splits). A program takes one (request, KV head), all query heads
of its GQA group at once (a [group, D] x [D, tokens] product on the tensor cores), and every SPLITS-th chunk of the
row's selected pages (each row's own count is split evenly, so one fixed grid suits a CUDA graph); it keeps
an online softmax and writes its partial output and log-sum-exp. A second kernel merges the splits; with one split
(`plan_splits` counts the resident waves of programs) the kernel writes the output directly (one launch).
Works on either cache layout through strides.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels.pdl import launch_options, pdl_enter, pdl_on
from sparrow_sgl.attention.pages import to_hnd
from sparrow_sgl.config import SparsityConfig


@triton.jit
def _page_ids(page_list, bt_row, entry, count):
    """(valid, logical page, physical page) of list entries `entry` of a row holding `count` entries."""
    ok = entry < count
    logical = tl.load(page_list + entry, mask=ok, other=0)
    phys = tl.load(bt_row + logical, mask=ok, other=0).to(tl.int64)
    return ok, logical, phys


@triton.jit
def _sparse_decode_kernel(
    q_ptr, stride_qb, stride_qh,
    k_ptr, v_ptr, stride_kp, stride_kh, stride_kt,
    block_table_ptr, stride_btb,
    seq_lens_ptr,
    pages_ptr, stride_pb, stride_ph,
    counts_ptr, stride_cb, stride_ch,
    part_out_ptr, part_lse_ptr,
    out_ptr, stride_ob, stride_oh,
    scale,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_P: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // KV_HEADS
    h = row % KV_HEADS
    seq = tl.load(seq_lens_ptr + b).to(tl.int32)
    count = tl.load(counts_ptr + b * stride_cb + h * stride_ch).to(tl.int32)
    # chunks of BLOCK_P entries go round-robin to the SPLITS programs of the row: short rows of a batch whose grid
    # was sized for long ones (a CUDA graph) still spread over every split
    first = split * BLOCK_P
    d = tl.arange(0, HEAD_DIM)
    g = tl.arange(0, BLOCK_G)
    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    tok = tl.arange(0, BLOCK_P * PAGE)
    in_page = tok % PAGE
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    page_list = pages_ptr + b * stride_pb + h * stride_ph
    bt_row = block_table_ptr + b * stride_btb
    step = SPLITS * BLOCK_P
    if PREFETCH:  # the next chunk's page ids load while this chunk's K/V stream in (off the dependent chain)
        ok_next, logical_next, phys_next = _page_ids(page_list, bt_row, first + tok // PAGE, count)
    for e in range(first, count, step):
        if PREFETCH:
            ok, logical, phys = ok_next, logical_next, phys_next
            ok_next, logical_next, phys_next = _page_ids(page_list, bt_row, e + step + tok // PAGE, count)
        else:
            ok, logical, phys = _page_ids(page_list, bt_row, e + tok // PAGE, count)
        ok = ok & (logical * PAGE + in_page < seq)
        offs = phys * stride_kp + h * stride_kh + in_page * stride_kt
        k = tl.load(k_ptr + offs[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_P * PAGE]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the first token of a selected page always exists
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    head = h * GROUP + g
    if SPLITS == 1:  # no partials to merge: the normalised output, in the output's dtype
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        dst = out_ptr + b * stride_ob + head[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
    else:
        part = (b * KV_HEADS * GROUP + head) * SPLITS + split
        has = first < count
        out = tl.where(has, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=(g < GROUP)[:, None])
        tl.store(part_lse_ptr + part, lse, mask=g < GROUP)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh,
    Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0)  # b * q_heads + head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0)
    parts = tl.load(part_out_ptr + (row * SPLITS + s)[:, None] * HEAD_DIM + d[None, :], mask=(s < SPLITS)[:, None])
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    b = row // Q_HEADS
    tl.store(out_ptr + b * stride_ob + (row % Q_HEADS) * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


WAVES_ENV = "SPARROW_DECODE_WAVES"  # set: the earlier split rule, aiming for this many programs per SM
RESIDENT_ENV = "SPARROW_DECODE_RESIDENT"  # decode programs one SM holds at once (default 4)
STAGES_ENV = "SPARROW_DECODE_STAGES"  # software-pipeline stages of the decode loop (Triton num_stages)
PREFETCH_ENV = "SPARROW_DECODE_PREFETCH"  # 1 (default): each iteration loads the next chunk's page ids
DECODE_WARPS_ENV = "SPARROW_DECODE_WARPS"  # warps per decode program (default 4)
BLOCK_ENV = "SPARROW_DECODE_BLOCK_PAGES"  # pages per loop iteration of a program (default 64 tokens' worth)
# 128 registers x 128 threads (4 warps, head_dim 128, bf16): 4 programs per H100 / H200 SM (bench.kernel_resources)
DEFAULT_RESIDENT = 4
MAX_SPLITS = 16
# The resident-wave plan's model. Costs in chunk-times (one chunk: BLOCK_P pages of one row): a program's own start
# and partial store, the merge launch, and each split's partials; a last wave holding fewer programs still takes
# TAIL_WAVE of a full one. Fitted to bench.decode_splits on an H200 (NOTES.md, session 17): the plan's split count
# is the fastest measured at 16 of its 21 shapes and within 2.3% of it at the others.
PROGRAM_COST, MERGE_COST, SPLIT_COST, TAIL_WAVE = 2.0, 2.0, 0.5, 0.9


def decode_tiling(page_size: int) -> tuple[int | None, int]:
    """(programs per SM of the earlier split rule, or None for the resident-wave plan; pages per iteration), read
    when a launch is built (or captured)."""
    text = os.environ.get(WAVES_ENV, "").strip()
    waves = int(text) if text else None
    block_p = int(os.environ.get(BLOCK_ENV, "").strip() or max(1, 64 // page_size))
    if (waves is not None and waves < 1) or block_p < 1 or block_p & (block_p - 1):
        raise ValueError(f"{WAVES_ENV}={waves} must be >= 1 and {BLOCK_ENV}={block_p} a power of two")
    return waves, block_p


def resident_programs() -> int:
    """Decode programs one SM holds at once: `SPARROW_DECODE_RESIDENT` (default 4)."""
    text = os.environ.get(RESIDENT_ENV, "").strip() or str(DEFAULT_RESIDENT)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{RESIDENT_ENV}={text!r} must be an integer >= 1")
    return int(text)


def decode_pipeline() -> tuple[int, bool, int]:
    """(Triton num_stages, page-id prefetch, warps) of the decode loop: `SPARROW_DECODE_STAGES` (1-4, default 2),
    `SPARROW_DECODE_PREFETCH` (0 or 1, default 1) and `SPARROW_DECODE_WARPS` (4 or 8, default 4; 8 spreads the
    [64, D] K/V tiles over twice the threads: 80 instead of 116-128 registers per thread, yet still 3 programs per
    H200 SM, and dense and sparse steps 10-16% slower, NOTES.md session 8); read when a launch is built (or captured).

    The prefetch takes the page-list and block-table loads off the chain that feeds each iteration's K/V loads:
    on an H200 it made dense and sparse rollouts 0.3-2.1% faster (bench/results/NOTES.md, session 7); 1 and 3
    stages were slower (1 stage: 7-25%)."""
    stages = os.environ.get(STAGES_ENV, "").strip() or "2"
    prefetch = os.environ.get(PREFETCH_ENV, "").strip() or "1"
    warps = os.environ.get(DECODE_WARPS_ENV, "").strip() or "4"
    if stages not in ("1", "2", "3", "4") or prefetch not in ("0", "1") or warps not in ("4", "8"):
        raise ValueError(f"{STAGES_ENV}={stages!r} must be 1-4, {PREFETCH_ENV}={prefetch!r} 0 or 1 and "
                         f"{DECODE_WARPS_ENV}={warps!r} 4 or 8")
    return int(stages), prefetch == "1", int(warps)


@functools.lru_cache(maxsize=4096)
def _resident_wave_splits(rows: int, chunks: int, slots: int) -> int:
    """The resident-wave plan's split count (cached: the engine asks for it at every step it loads)."""

    def modelled(s: int) -> tuple[float, int]:
        full, tail = divmod(rows * s, slots)
        wave_count = full + (max(tail / slots, TAIL_WAVE) if tail else 0)
        merge = MERGE_COST + SPLIT_COST * s if s > 1 else 0.0
        return wave_count * (-(-chunks // s) + PROGRAM_COST) + merge, s

    return min(range(1, min(chunks, MAX_SPLITS) + 1), key=modelled)


def plan_splits(rows: int, max_entries: int, block_p: int, num_sms: int, waves: int | None = None
                ) -> tuple[int, int]:
    """(splits, pages per split) of a launch over `rows` live (request, KV head) rows of <= max_entries pages.

    Default, the resident-wave plan: the GPU runs its `resident_programs()` x SMs programs in waves, and a wave of
    long programs only partly filled leaves the DRAM idle (3 splits of 200 rows: 27% slower than 5). Among 1..16
    splits it picks the fewest with the least modelled time: waves x (chunks per program + PROGRAM_COST), + MERGE_COST
    + SPLIT_COST per split when split. waves given (`SPARROW_DECODE_WAVES`): the earlier rule, enough programs to
    fill every SM `waves` times over, counting padding rows as live ones."""
    chunks = max(triton.cdiv(max_entries, block_p), 1)
    if waves is not None:
        splits = min(max(triton.cdiv(waves * num_sms, rows), 1), chunks)
    else:
        splits = _resident_wave_splits(max(rows, 1), chunks, num_sms * resident_programs())
    pages_per_split = triton.cdiv(chunks, splits) * block_p
    return triton.cdiv(max(max_entries, 1), pages_per_split), pages_per_split


def triton_attend_pages(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    pages: torch.Tensor,
    counts: torch.Tensor,
    cfg: SparsityConfig,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of q [batch, q_heads, D] over the pages listed per (request, KV head).

    pages: [batch, kv_heads or 1, K] logical page indices, the first counts[b, h] of each row attended (any order);
    counts: [batch, kv_heads or 1] int. Size-1 head dims broadcast (dense: one list for all heads).
    splits: programs per row (None: `plan_splits` over every row). A CUDA-graph step passes the plan of its live
    requests' rows (its padding rows' programs exit at once); benchmarks force it to measure the plan.
    """
    batch, q_heads, head_dim = q.shape
    k_hnd, v_hnd = to_hnd(k_cache, cfg), to_hnd(v_cache, cfg)
    kv_heads = k_hnd.shape[1]
    if k_hnd.stride() != v_hnd.stride() or k_hnd.stride(3) != 1:
        raise ValueError("k_cache and v_cache must share strides with a contiguous head_dim")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernel, got {head_dim}")
    if (pages.dim() != 3 or pages.shape[0] != batch or counts.dim() != 2 or counts.shape[0] != batch
            or counts.shape[1] not in (1, pages.shape[1])):
        raise ValueError(f"pages [batch, heads, K] and counts [batch, heads] disagree: {pages.shape}, {counts.shape}")
    group = q_heads // kv_heads
    waves, block_p = decode_tiling(cfg.page_size)
    stages, prefetch, warps = decode_pipeline()
    if splits is None:
        splits, _ = plan_splits(batch * kv_heads, pages.shape[2], block_p, num_sms(q.device), waves)
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dim, got {tuple(out.shape)}")
    part_out = torch.empty(batch * q_heads * splits if splits > 1 else 1, head_dim, dtype=torch.float32,
                           device=q.device)
    part_lse = torch.empty(part_out.shape[0], dtype=torch.float32, device=q.device)
    head_stride = lambda t: t.stride(1) if t.shape[1] > 1 else 0
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    pdl = pdl_on(q.device)
    _sparse_decode_kernel[(batch * kv_heads, splits)](
        q, q.stride(0), q.stride(1),
        k_hnd, v_hnd, k_hnd.stride(0), k_hnd.stride(1), k_hnd.stride(2),
        block_table, block_table.stride(0),
        seq_lens,
        pages, pages.stride(0), head_stride(pages),
        counts, counts.stride(0), head_stride(counts),
        part_out, part_lse,
        out, out.stride(0), out.stride(1),
        scale,
        KV_HEADS=kv_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        PAGE=cfg.page_size, BLOCK_P=block_p, SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PREFETCH=prefetch, PDL=pdl,
        num_warps=warps, num_stages=stages, **launch_options(pdl),
    )
    if splits == 1:
        return out
    _merge_splits_kernel[(batch * q_heads,)](
        part_out, part_lse, out, out.stride(0), out.stride(1),
        Q_HEADS=q_heads, HEAD_DIM=head_dim, SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), PDL=pdl,
        **launch_options(pdl),
    )
    return out
