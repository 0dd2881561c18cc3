"""Fused page selection in Triton: score every page once, then an exact per-row top-k in ascending page order.

One launch per decode step (`select_pages_into`, the default), graph-capturable and sync-free:
grid (batch * kv_heads, page chunks). Each program reads its chunk of a row's page summaries exactly once
(centroid: key_sum [+ count]; quest: key_min + key_max) and writes one float score per page, sink and local pages
forced to +inf; many programs per row keep the summary read at memory bandwidth. Each program then takes a ticket
from a per-row counter (atomic, acq_rel); the last program of the row to arrive runs the row's top-k over the
scores just written (L2-resident) and resets the counter for the next launch (so CUDA-graph replays need no memset).
The top-k is a radix select on order-preserving integer keys, 8 bits per round (4 rounds of a 256-bin histogram), over
the row's actual pages (a device-side loop over BLOCK_N chunks; the first chunk stays in registers): its cost scales
with the request's page count, not the block table's width. It keeps the pages above the k-th largest key plus the
lowest-index ties and writes them compacted in ascending order (no sort); rows whose budget covers all their pages
skip the search. It can also write FlashInfer's ragged page list (physical page * kv_heads + head, see
`flashinfer_decode`) and each row's last-page length, so attention reads the selection with no torch glue.

`one_launch=False` runs the phase-3 pair of launches instead (`_score_pages_kernel`, then `_topk_pages_kernel`:
a 32-step bitwise search over a block sized by the table's width). The pair measured 4-9% faster end to end on an
H100 (bench/results/NOTES.md, phase 4), so the CUDA-graph decode of the engine and of the SGLang backend passes
one_launch=False unless SPARROW_SELECT_LAUNCHES=1; eager callers get the one-launch default.
Same contract as `sparrow_sgl.attention.select.select_pages` (selection identical up to ties of equal scores).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels.pdl import launch_options, pdl_enter, pdl_on
from sparrow_sgl.attention.kernels.triton_centroid import bf16_centroid
from sparrow_sgl.attention.pages import PageSummaries
from sparrow_sgl.attention.select import Selection, budget_pages_tensor
from sparrow_sgl.config import SparsityConfig

TOPK_BITS_ENV = "SPARROW_TOPK_BITS"
TOPK_WARPS_ENV = "SPARROW_TOPK_WARPS"
TOPK_EXIT_ENV = "SPARROW_TOPK_EXIT"
# 1: on an H200 the 4-bit search ([pages, 16] comparisons per step) made the top-k launch so much slower that
# sparse rollouts lost 8-20% (bench/results/NOTES.md, session 5); 2/4/8 stay selectable for other GPUs
DEFAULT_TOPK_BITS = 1
SCORE_TILE_ENV = "SPARROW_SCORE_TILE"  # "PAGESxBLOCKxWARPS" overrides the scoring tile (benchmarks)
DEFAULT_PAGES_PER_PROG = 128
MAX_PAGES_PER_ROW = 32768  # the two-launch top-k holds a whole row in one program
TOPK_CHUNK = 2048  # pages per chunk of the one-launch top-k (rows up to 32K tokens at page 16 stay in registers)


@triton.jit
def _score_range(
    q_ptr, stride_qb, stride_qh,
    sum_ptr, min_ptr, max_ptr, stride_sp, stride_sh,
    count_ptr, bt_row, score_row, b, h, start, n_pages,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    SINK: tl.constexpr, LOCAL: tl.constexpr,
    BLOCK_P: tl.constexpr, PAGES_PER_PROG: tl.constexpr, QUEST: tl.constexpr, DIVIDE: tl.constexpr,
    ROUND: tl.constexpr,
):
    """Scores of pages [start, start + PAGES_PER_PROG) of one (request, KV head) row into score_row."""
    d = tl.arange(0, HEAD_DIM)
    g = tl.arange(0, BLOCK_G)
    q_rows = q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_rows, mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)  # [BLOCK_G, D]
    q_mean = tl.sum(q, 0) / GROUP
    for p0 in range(0, PAGES_PER_PROG, BLOCK_P):
        idx = start + p0 + tl.arange(0, BLOCK_P)
        exists = idx < n_pages
        phys = tl.load(bt_row + idx, mask=exists, other=0).to(tl.int64)
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
            if ROUND:  # centroid-bf16 from the sums: the centroid correctly rounded, then to bf16, as the reference
                count = tl.load(count_ptr + phys, mask=exists, other=1)
                ksum = bf16_centroid(ksum, tl.maximum(count, 1).to(tl.float32)[:, None])
            score = tl.sum(ksum * q_mean[None, :], 1)
            if DIVIDE and not ROUND:
                count = tl.load(count_ptr + phys, mask=exists, other=1)
                score = score / tl.maximum(count, 1).to(tl.float32)
        forced = (idx < SINK) | (idx >= n_pages - LOCAL)
        score = tl.where(forced, float("inf"), score)
        tl.store(score_row + idx, score, mask=exists)


@triton.jit
def _order_key(score):
    """Order-preserving map float32 -> uint32: flip all bits of negatives, the sign bit of the rest."""
    bits = score.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _load_keys(score_row, idx, n_pages):
    exists = idx < n_pages
    # .cg: read at L2, where the other programs of the row stored their scores
    score = tl.load(score_row + idx, mask=exists, other=0.0, cache_modifier=".cg")
    return tl.where(exists, _order_key(score), 0), exists


@triton.jit
def _digit_counts(key, exists, prefix, known, shift):
    """[256] histogram of the 8-bit digit at `shift` among existing keys whose already-fixed bits equal `prefix`."""
    match = exists & ((key & known) == prefix)
    digit = ((key >> shift) & 255).to(tl.int32)
    return tl.histogram(digit, 256, mask=match)


@triton.jit
def _emit_chunk(idx, exists, key, thresh, need, take_all, base, tie_base, last, out_row, bt_row, csr_row,
                KV_HEADS: tl.constexpr, h, WRITE_CSR: tl.constexpr):
    """Compact one chunk's chosen pages to out_row[base:] (and the CSR list); returns the running totals."""
    ties = exists & (key == thresh)
    tie_rank = tie_base + tl.cumsum(ties.to(tl.int32), 0) - 1
    chosen = exists & (take_all | (key > thresh) | (ties & (tie_rank < need)))
    pos = base + tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(out_row + pos, idx, mask=chosen)
    if WRITE_CSR:
        phys = tl.load(bt_row + idx, mask=chosen, other=0)
        tl.store(csr_row + pos, phys * KV_HEADS + h, mask=chosen)
    base += tl.sum(chosen.to(tl.int32), 0)
    tie_base += tl.sum(ties.to(tl.int32), 0)
    last = tl.maximum(last, tl.max(tl.where(chosen, idx, -1), 0))
    return base, tie_base, last


@triton.jit
def _topk_row(
    score_row, n_pages, k, seq, out_row, k_cols, bt_row, csr_row, last_len_ptr, row, h,
    KV_HEADS: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_CSR: tl.constexpr,
):
    """Exact top-k of one row's scores: radix select of the k-th largest key, then ascending compaction."""
    idx0 = tl.arange(0, BLOCK_N)
    key0, ex0 = _load_keys(score_row, idx0, n_pages)
    digits = tl.arange(0, 256)
    prefix = tl.zeros([], tl.uint32)
    known = tl.zeros([], tl.uint32)
    need = k
    take_all = k >= n_pages
    if k < n_pages:
        for r in tl.static_range(4):
            shift = 24 - 8 * r
            counts = _digit_counts(key0, ex0, prefix, known, shift)
            for c in range(BLOCK_N, n_pages, BLOCK_N):
                key, ex = _load_keys(score_row, c + idx0, n_pages)
                counts += _digit_counts(key, ex, prefix, known, shift)
            # keys at or above each digit; the k-th largest has the largest digit whose count still reaches `need`
            at_or_above = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts
            digit = tl.max(tl.where(at_or_above >= need, digits, 0), 0)
            need -= tl.sum(tl.where(digits > digit, counts, 0), 0)
            prefix = prefix | (digit.to(tl.uint32) << shift)
            known = known | (tl.full([], 255, tl.uint32) << shift)
    thresh = prefix  # the k-th largest key; `need` of the keys equal to it are taken, lowest page index first
    zero = tl.zeros([], tl.int32)
    base, tie_base, last = _emit_chunk(idx0, ex0, key0, thresh, need, take_all, zero, zero, zero - 1, out_row,
                                       bt_row, csr_row, KV_HEADS, h, WRITE_CSR)
    for c in range(BLOCK_N, n_pages, BLOCK_N):
        key, ex = _load_keys(score_row, c + idx0, n_pages)
        base, tie_base, last = _emit_chunk(c + idx0, ex, key, thresh, need, take_all, base, tie_base, last,
                                           out_row, bt_row, csr_row, KV_HEADS, h, WRITE_CSR)
    for c in range(k, k_cols, BLOCK_N):  # unused entries of the page list: 0
        tl.store(out_row + c + idx0, tl.zeros([BLOCK_N], tl.int32), mask=c + idx0 < k_cols)
    if WRITE_CSR:
        last_len = tl.where(last == n_pages - 1, seq - (n_pages - 1) * PAGE, PAGE)
        tl.store(last_len_ptr + row, last_len)


@triton.jit
def _select_pages_kernel(
    q_ptr, stride_qb, stride_qh,
    sum_ptr, min_ptr, max_ptr, stride_sp, stride_sh,
    count_ptr,
    block_table_ptr, stride_btb,
    seq_lens_ptr, budget_pages_ptr,
    scores_ptr, stride_ob, stride_oh,
    counter_ptr,
    pages_ptr, stride_pb, stride_ph, k_cols,
    csr_ptr, row_start_ptr, last_len_ptr,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr,
    BLOCK_P: tl.constexpr, PAGES_PER_PROG: tl.constexpr, QUEST: tl.constexpr, DIVIDE: tl.constexpr,
    ROUND: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_CSR: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0)
    b = row // KV_HEADS
    h = row % KV_HEADS
    chunk = tl.program_id(1)
    start = chunk * PAGES_PER_PROG
    seq = tl.load(seq_lens_ptr + b).to(tl.int32)
    n_pages = (seq + PAGE - 1) // PAGE
    arrivals = tl.maximum((n_pages + PAGES_PER_PROG - 1) // PAGES_PER_PROG, 1)  # programs of this row with work
    if chunk < arrivals:
        bt_row = block_table_ptr + b * stride_btb
        score_row = scores_ptr + b * stride_ob + h * stride_oh
        if start < n_pages:
            _score_range(q_ptr, stride_qb, stride_qh, sum_ptr, min_ptr, max_ptr, stride_sp, stride_sh, count_ptr,
                         bt_row, score_row, b, h, start, n_pages, GROUP, BLOCK_G, HEAD_DIM, SINK, LOCAL, BLOCK_P,
                         PAGES_PER_PROG, QUEST, DIVIDE, ROUND)
        tl.debug_barrier()  # every thread's score stores precede the release below
        ticket = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
        if ticket == arrivals - 1:  # the row's last program: every score of the row is written
            tl.store(counter_ptr + row, 0)  # ready for the next launch (graph replay)
            tl.debug_barrier()
            k = tl.minimum(tl.load(budget_pages_ptr + b).to(tl.int32), n_pages)
            csr_row = csr_ptr
            if WRITE_CSR:
                csr_row = csr_ptr + tl.load(row_start_ptr + row)
            _topk_row(score_row, n_pages, k, seq, pages_ptr + b * stride_pb + h * stride_ph, k_cols, bt_row,
                      csr_row, last_len_ptr, row, h, KV_HEADS, PAGE, BLOCK_N, WRITE_CSR)


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
    ROUND: tl.constexpr, PDL: tl.constexpr,
):
    """Two-launch baseline, launch 1: scores only."""
    pdl_enter(PDL)
    row = tl.program_id(0)
    b = row // KV_HEADS
    h = row % KV_HEADS
    start = tl.program_id(1) * PAGES_PER_PROG
    seq = tl.load(seq_lens_ptr + b).to(tl.int32)
    n_pages = (seq + PAGE - 1) // PAGE
    if start < n_pages:
        _score_range(q_ptr, stride_qb, stride_qh, sum_ptr, min_ptr, max_ptr, stride_sp, stride_sh, count_ptr,
                     block_table_ptr + b * stride_btb, scores_ptr + b * stride_ob + h * stride_oh, b, h, start,
                     n_pages, GROUP, BLOCK_G, HEAD_DIM, SINK, LOCAL, BLOCK_P, PAGES_PER_PROG, QUEST, DIVIDE, ROUND)


@triton.jit
def _search_goes_on(shift, count, k, EARLY_EXIT: tl.constexpr):
    if EARLY_EXIT:
        return (shift >= 0) & (count != k)
    return shift >= 0


@triton.jit
def _kth_largest_key(key, exists, k, BITS: tl.constexpr, EARLY_EXIT: tl.constexpr):
    """A threshold t with exactly the top-k keys at or above it, up to ties at t (then t is the k-th largest key).

    Built from the top bit down: t is the largest value whose count(key >= t) still reaches k. With EARLY_EXIT the
    search stops as soon as that count is exactly k (the keys >= t are then the top k; the caller's tie handling
    takes all of them), typically ~20 of 32 steps for a 2K-page row, and at once for rows whose budget covers all
    their pages (the graph's padding rows included). BITS = 2 counts its three candidates in one reduction (three
    16-bit counts packed in an int64); BITS 4 and 8 count 2^BITS - 1 candidates in one 2-D reduction (measured
    slower on an H200: DEFAULT_TOPK_BITS)."""
    thresh = tl.zeros([], tl.uint32)
    if BITS == 1 and not EARLY_EXIT:
        for bit in tl.static_range(31, -1, -1):
            cand = thresh | (tl.full([], 1, tl.uint32) << bit)
            n_ge = tl.sum((key >= cand).to(tl.int32), 0)
            thresh = tl.where(n_ge >= k, cand, thresh)
    elif BITS <= 2:
        count = tl.sum(exists.to(tl.int32), 0)  # keys >= thresh (0): every existing key
        shift = tl.full([], 32 - BITS, tl.int32)
        while _search_goes_on(shift, count, k, EARLY_EXIT):
            s = shift.to(tl.uint32)
            c1 = thresh | (tl.full([], 1, tl.uint32) << s)
            if BITS == 1:
                n1 = tl.sum((key >= c1).to(tl.int32), 0)
                thresh = tl.where(n1 >= k, c1, thresh)
                count = tl.where(n1 >= k, n1, count)
            else:
                c2 = thresh | (tl.full([], 2, tl.uint32) << s)
                c3 = thresh | (tl.full([], 3, tl.uint32) << s)
                packed = ((key >= c1).to(tl.int64) + ((key >= c2).to(tl.int64) << 16)
                          + ((key >= c3).to(tl.int64) << 32))
                total = tl.sum(packed, 0)  # counts <= MAX_PAGES_PER_ROW (32768) fit 16 bits
                n1 = (total & 0xFFFF).to(tl.int32)
                n2 = ((total >> 16) & 0xFFFF).to(tl.int32)
                n3 = ((total >> 32) & 0xFFFF).to(tl.int32)
                thresh = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, thresh)))
                count = tl.where(n3 >= k, n3, tl.where(n2 >= k, n2, tl.where(n1 >= k, n1, count)))
            shift -= BITS
    else:
        digits = tl.arange(0, 1 << BITS).to(tl.uint32)
        for step in tl.static_range(32 // BITS):
            cand = thresh | (digits << (32 - BITS * (step + 1)))  # [2^BITS]; digit 0 is thresh (count >= k)
            n_ge = tl.sum((key[:, None] >= cand[None, :]).to(tl.int32), 0)
            thresh = tl.max(tl.where(n_ge >= k, cand, thresh), 0)
    return thresh


@triton.jit
def _topk_pages_kernel(
    scores_ptr, stride_sb, stride_sh,
    seq_lens_ptr, budget_pages_ptr,
    block_table_ptr, stride_btb,
    pages_ptr, stride_pb, stride_ph, k_cols,
    csr_ptr, row_start_ptr, last_len_ptr,
    KV_HEADS: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_CSR: tl.constexpr,
    BITS: tl.constexpr, EARLY_EXIT: tl.constexpr, PDL: tl.constexpr,
):
    """Two-launch baseline, launch 2: a search for the k-th largest key over the whole width, BITS bits per step."""
    pdl_enter(PDL)
    row = tl.program_id(0)
    b = row // KV_HEADS
    h = row % KV_HEADS
    seq = tl.load(seq_lens_ptr + b).to(tl.int32)
    n_pages = (seq + PAGE - 1) // PAGE
    k = tl.minimum(tl.load(budget_pages_ptr + b).to(tl.int32), n_pages)
    idx = tl.arange(0, BLOCK_N)
    exists = idx < n_pages
    score = tl.load(scores_ptr + b * stride_sb + h * stride_sh + idx, mask=exists, other=0.0)
    key = tl.where(exists, _order_key(score), 0)
    thresh = _kth_largest_key(key, exists, k, BITS, EARLY_EXIT)
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


def _env_ints(name: str, count: int, form: str) -> list[int] | None:
    """`count` positive powers of two from environment variable `name` ('x'-separated), None when unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    parts = text.replace("x", ",").split(",")
    if len(parts) != count or not all(p.strip().isdigit() and int(p) > 0 and not int(p) & (int(p) - 1)
                                      for p in parts):
        raise ValueError(f"{name}={text!r}: expected {form} (powers of two)")
    return [int(p) for p in parts]


def topk_bits(block_n: int) -> int:
    """Bits per search step of the two-launch top-k: `SPARROW_TOPK_BITS` (1, 2, 4 or 8; default 1), capped so the
    [block_n, 2^bits] comparison block stays <= 64K elements (registers: 2048 pages x 16 candidates, 16 warps)."""
    bits = (_env_ints(TOPK_BITS_ENV, 1, "1, 2, 4 or 8") or [DEFAULT_TOPK_BITS])[0]
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"{TOPK_BITS_ENV}={bits}: choose 1, 2, 4 or 8")
    while bits > 1 and block_n << bits > 65536:
        bits //= 2
    return bits


def topk_early_exit() -> bool:
    """Whether the two-launch top-k stops searching once exactly k keys sit at or above its threshold
    (`SPARROW_TOPK_EXIT`, 1 or 0; default 1). The selection is the same either way."""
    text = os.environ.get(TOPK_EXIT_ENV, "").strip() or "1"
    if text not in ("0", "1"):
        raise ValueError(f"{TOPK_EXIT_ENV}={text!r}: choose 1 (stop early) or 0 (search all 32 bits)")
    return text == "1"


def topk_warps(block_n: int) -> int:
    """Warps of a top-k program: `SPARROW_TOPK_WARPS` (1-16, a power of two); default one warp up to 256 pages, then
    4 per 2048 pages (4..16). One warp makes each of the search's reductions cheaper (shuffles only, no shared
    memory or barrier) at the cost of more elements per thread: on an H200 (session 15) it saved 20-40 us a step at
    64-256 pages and lost from 512 pages on."""
    default = 1 if block_n <= 256 else min(16, max(4, block_n // 512))
    warps = (_env_ints(TOPK_WARPS_ENV, 1, "1, 2, 4, 8 or 16") or [default])[0]
    if warps > 16:
        raise ValueError(f"{TOPK_WARPS_ENV}={warps}: choose 1, 2, 4, 8 or 16")
    return warps


def score_tiling(rows: int, max_pages: int, device: torch.device, pages_per_prog: int | None = None,
                 block_p: int | None = None, num_warps: int | None = None) -> tuple[int, int, int]:
    """(pages per program, pages per tile, warps) of the scoring grid; None picks the default.

    Default: 128 pages per program, one tile of 128 pages, 4 warps. The H100 sweep (bench/results/NOTES.md phase 4)
    chose 128..256 pages per program (256 for large grids); on an H200 (session 5) 128 everywhere made sparse
    rollouts 2% faster for 1.7B, 4B and 8B alike (more programs in flight; the 256-page programs' second tile
    waited on the first)."""
    forced = _env_ints(SCORE_TILE_ENV, 3, "PAGESxBLOCKxWARPS, e.g. 128x128x4")
    if forced and pages_per_prog is None:
        pages_per_prog, block_p, num_warps = forced
    if pages_per_prog is None:
        pages_per_prog = DEFAULT_PAGES_PER_PROG
    pages_per_prog = min(pages_per_prog, max(triton.next_power_of_2(max_pages), 16))
    block_p = min(block_p or 128, pages_per_prog)
    return pages_per_prog, block_p, num_warps or 4


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
    counters: torch.Tensor | None = None,
    csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    pages_per_prog: int | None = None,
    block_p: int | None = None,
    num_warps: int | None = None,
    one_launch: bool = True,
    topk: bool = True,
    topk_chunk: int = TOPK_CHUNK,
    all_heads: bool = False,
) -> torch.Tensor:
    """Write the selected logical pages of every (request, KV head) into `pages_out` [batch, kv_heads, K] int32.

    Allocation-free and sync-free when `scores` and `counters` are given, so it can be captured in a CUDA graph.
    budget_pages: [batch] int32 pages per request (clamped to the request's pages here). Row r = b * kv_heads + h
    gets min(budget_pages[b], n_pages[b]) pages in ascending order; the rest of its K entries are set to 0.
    Centroid scorer: `key_sum` [pages, kv_heads, D] (any float dtype) and `count` [pages] (None: key_sum already
    holds centroids). Quest scorer: `key_min` and `key_max`. csr = (indices, row_start [rows], last_len [rows])
    additionally writes FlashInfer's per-(request, KV head) page list: indices[row_start[r] + i] = physical
    page * kv_heads + h of the row's i-th selected page (row_start must be the exclusive cumsum of the row counts).
    counters: int32 [>= batch * kv_heads], zero before the first call; the one-launch kernel leaves it zero again.
    pages_per_prog / block_p / num_warps: the scoring tile (`score_tiling`); one_launch=False: the two-launch
    baseline; topk=False: scoring only (two-launch path; benchmarks time the parts apart); topk_chunk: pages per
    chunk of the one-launch top-k (a power of two; tests use small ones to exercise the multi-chunk loop).
    all_heads: the two-launch path scores the centroid scorer's pages with one program per (request, page chunk)
    over every KV head (`triton_score_heads`) instead of one per (request, KV head, page chunk).
    Returns the scores buffer [batch, kv_heads, max_pages] (entries past a request's pages are unwritten).
    """
    batch, q_heads, head_dim = q.shape
    quest = cfg.scorer == "quest"
    summary = key_min if quest else key_sum
    if summary is None or (quest and key_max is None):
        raise ValueError(f"scorer {cfg.scorer!r} needs " + ("key_min and key_max" if quest else "key_sum"))
    kv_heads = summary.shape[1]
    max_pages = block_table.shape[1]
    rows = batch * kv_heads
    if q_heads % kv_heads or summary.shape[2] != head_dim or summary.stride(2) != 1:
        raise ValueError(f"summaries {tuple(summary.shape)} (last dim contiguous) do not fit q {tuple(q.shape)}")
    if quest and key_max.stride() != key_min.stride():
        raise ValueError("key_min and key_max must share strides")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the Triton kernels, got {head_dim}")
    if not one_launch and max_pages > MAX_PAGES_PER_ROW:
        raise ValueError(f"block table has {max_pages} pages per request; the top-k kernel holds {MAX_PAGES_PER_ROW}")
    if pages_out.shape[:2] != (batch, kv_heads) or pages_out.dtype != torch.int32 or pages_out.stride(2) != 1:
        raise ValueError(f"pages_out must be int32 [{batch}, {kv_heads}, K], got {pages_out.dtype} "
                         f"{tuple(pages_out.shape)}")
    if pages_out.shape[2] > max(triton.next_power_of_2(max_pages), 16):
        raise ValueError(f"pages_out has {pages_out.shape[2]} columns, more than the {max_pages} pages per request")
    if counters is not None and (counters.dtype != torch.int32 or counters.numel() < rows or not
                                 counters.is_contiguous()):
        raise ValueError(f"counters must be a contiguous int32 tensor of >= {rows} entries (zeros)")
    if topk_chunk < 16 or topk_chunk & (topk_chunk - 1):
        raise ValueError(f"topk_chunk must be a power of two >= 16, got {topk_chunk}")
    if scores is None:
        scores = torch.empty(batch, kv_heads, max_pages, dtype=torch.float32, device=q.device)
    group = q_heads // kv_heads
    ppp, block_p, warps = score_tiling(rows, max_pages, q.device, pages_per_prog, block_p, num_warps)
    summaries = (key_sum if key_sum is not None else summary, key_min if quest else summary,
                 key_max if quest else summary, summary.stride(0), summary.stride(1),
                 count if count is not None else seq_lens)
    shape = dict(KV_HEADS=kv_heads, GROUP=group, BLOCK_G=triton.next_power_of_2(group), HEAD_DIM=head_dim,
                 PAGE=cfg.page_size, SINK=cfg.sink_pages, LOCAL=cfg.local_pages, BLOCK_P=block_p,
                 PAGES_PER_PROG=ppp, QUEST=quest, DIVIDE=count is not None,
                 ROUND=cfg.bf16_centroids and count is not None)
    grid = (rows, triton.cdiv(max_pages, ppp))
    pdl = pdl_on(q.device)
    indices, row_start, last_len = csr if csr is not None else (pages_out, pages_out, pages_out)
    if one_launch and topk:
        if counters is None:
            counters = torch.zeros(rows, dtype=torch.int32, device=q.device)
        _select_pages_kernel[grid](
            q, q.stride(0), q.stride(1), *summaries,
            block_table, block_table.stride(0),
            seq_lens, budget_pages,
            scores, scores.stride(0), scores.stride(1),
            counters,
            pages_out, pages_out.stride(0), pages_out.stride(1), pages_out.shape[2],
            indices, row_start, last_len,
            **shape, BLOCK_N=min(max(triton.next_power_of_2(max_pages), 16), topk_chunk), WRITE_CSR=csr is not None,
            PDL=pdl, num_warps=warps, **launch_options(pdl),
        )
        return scores
    if all_heads and not quest and not kv_heads & (kv_heads - 1):
        from sparrow_sgl.attention.kernels.triton_score_heads import score_pages_all_heads

        score_pages_all_heads(q, block_table, seq_lens, summaries[0], count, scores, page_size=cfg.page_size,
                              sink_pages=cfg.sink_pages, local_pages=cfg.local_pages, bf16=cfg.bf16_centroids)
    else:
        _score_pages_kernel[grid](
            q, q.stride(0), q.stride(1), *summaries,
            block_table, block_table.stride(0),
            seq_lens,
            scores, scores.stride(0), scores.stride(1),
            **shape, PDL=pdl, num_warps=warps, **launch_options(pdl),
        )
    if not topk:
        return scores
    block_n = max(triton.next_power_of_2(max_pages), 16)
    _topk_pages_kernel[(rows,)](
        scores, scores.stride(0), scores.stride(1),
        seq_lens, budget_pages,
        block_table, block_table.stride(0),
        pages_out, pages_out.stride(0), pages_out.stride(1), pages_out.shape[2],
        indices, row_start, last_len,
        KV_HEADS=kv_heads, PAGE=cfg.page_size, BLOCK_N=block_n, WRITE_CSR=csr is not None,
        BITS=topk_bits(block_n), EARLY_EXIT=topk_early_exit(), PDL=pdl, num_warps=topk_warps(block_n),
        **launch_options(pdl),
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
