"""The decoder's MLP half in one persistent launch: residual add + RMSNorm, the gate_up GEMM, and the down GEMM with
SiLU x up fused into its load. An experiment towards a persistent decode layer (issue 19), measured by
`bench/mlp_block.py` against the three-launch chain the engine runs today; the engine does not use it yet.

Why: at decode batch sizes every kernel of the step pays a ramp and a tail (1.8-5 us a boundary on an H200,
`bench/results/launch_boundary.json`), ~11 kernels a layer. Here a fixed grid of programs takes work items from
one queue (an atomic counter) in order: the M norm rows, then the gate_up output tiles (the gate tile and the up
tile of the same columns next to each other), then the down tiles, K slice by K slice. An item waits (spinning on
flags in L2) only for items earlier in the queue, which programs already running hold, so no grid size can
deadlock and the programs need not all be resident; and down tiles of the first K slices start while gate_up tiles
of the last ones still stream, so the two GEMMs overlap instead of draining between launches.

Same arithmetic as the chain: a norm row as `triton_fused._add_rms_norm_kernel` (up to float32 reduction order), a
GEMM tile as `triton_linear._linear_kernel` (its device functions; split-K partials summed in split order by the
tile's last program). The queue, the flags and the split tickets live in `triton_linear.workspace`'s counters, zero
between launches: the last program to leave resets what it used, so CUDA-graph replays need no memset. Reads of
data another program wrote in this launch (h, gate_up) happen only after their flags, on cache lines no program of
this launch read before (slices are whole 128-byte lines: `I % 64 == 0` is required).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels import triton_linear as tlin
from sparrow_sgl.attention.kernels.triton_fused import _round
from sparrow_sgl.attention.kernels.triton_linear import MAX_M, Config, block_m, fit_split, num_sms, workspace

NORM_CHUNK = 512  # columns of a norm row per step
STATE_SLOTS = 3  # queue, programs that left, norm rows done; then gate_up flags, gate_up tickets, down tickets


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """Tiles of the two GEMMs and the persistent grid. Both GEMMs run in one kernel: one warp count and one pipeline
    depth (gate_up's)."""

    gate_up: Config
    down: Config
    programs: int


def default_plan(m: int, hidden: int, inter: int, device: torch.device, programs: int | None = None,
                 block_n: int = 64, block_k: int = 128) -> BlockPlan:
    """Two programs per SM; each GEMM split along K until its items cover the grid."""
    programs = programs or 2 * num_sms(device)
    gate_up = Config(block_n, block_k, fit_split(2 * inter, hidden, block_n, block_k, programs), 4, 3)
    down = Config(block_n, block_k, fit_split(hidden, inter, block_n, block_k, programs), 4, 3)
    return BlockPlan(gate_up, down, programs)


@triton.jit
def _wait_count(ptr, target):
    seen = tl.atomic_add(ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(ptr, 0, sem="acquire")


@triton.jit
def _wait_flags(flags_ptr, first, last, BLOCK: tl.constexpr):
    """Until flags[first:last] are all set (last - first <= BLOCK)."""
    idx = first + tl.arange(0, BLOCK)
    valid = idx < last
    ready = tl.min(tl.where(valid, tl.atomic_add(flags_ptr + idx, 0, mask=valid, sem="acquire"), 1), 0)
    while ready == 0:
        ready = tl.min(tl.where(valid, tl.atomic_add(flags_ptr + idx, 0, mask=valid, sem="acquire"), 1), 0)


@triton.jit
def _norm_row(x_ptr, stride_x, res_ptr, stride_r, w_ptr, h_ptr, res_out_ptr, row, H, eps, CHUNK: tl.constexpr):
    """h[row] = RMSNorm(x + residual) * w and residual_out[row] = x + residual, rounded as the fused kernel does,
    CHUNK columns at a time (a whole 4096-wide row at once would cost the GEMM items registers)."""
    dtype = h_ptr.dtype.element_ty
    squares = tl.zeros([CHUNK], tl.float32)
    for c0 in range(0, H, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        mask = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, dtype)
        tl.store(res_out_ptr + row * H + cols, x.to(dtype), mask=mask)
        squares += x * x
    rstd = tl.rsqrt(tl.sum(squares, axis=0) / H + eps)
    tl.debug_barrier()  # the sums were stored by other threads of this program
    for c0 in range(0, H, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        mask = cols < H
        x = tl.load(res_out_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * H + cols, _round(w * _round(x * rstd, dtype), dtype).to(dtype), mask=mask)


@triton.jit
def _gemm_item(
    x_ptr, stride_xm, w_ptr, stride_wn, out_ptr, stride_om, part_ptr, ticket_ptr,
    M, N, K, tile, split, k_per_split, n_splits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    SILU: tl.constexpr, F32_DOT: tl.constexpr,
):
    """One (output tile, K split) of x @ W^T, as `_linear_kernel` computes it; 1 if this program completed the
    output tile (no split, or the tile's last split to arrive), else 0."""
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + tl.minimum(m, M - 1).to(tl.int64)[None, :] * stride_xm
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + kk
        acc = tlin._dot(tlin._w_tile(w_rows, k, K, EVEN_K), tlin._x_tile(x_rows, k, K, EVEN_K, SILU), acc, F32_DOT)
    done = tl.full([], 1, tl.int32)
    if n_splits == 1:
        tlin._store_out(acc, out_ptr, stride_om, out_ptr, n, m, M, N, False)
    else:
        mask = (n < N)[:, None] & (m < M)[None, :]
        offs = m[None, :] * N + n[:, None]
        tl.store(part_ptr + split.to(tl.int64) * M * N + offs, acc, mask=mask)
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel")
        done = (ticket == n_splits - 1).to(tl.int32)
        if done != 0:
            tl.store(ticket_ptr + tile, 0)
            tl.debug_barrier()
            total = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, n_splits):
                total += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tlin._store_out(total, out_ptr, stride_om, out_ptr, n, m, M, N, False)
    return done


@triton.jit
def _mlp_block_kernel(
    x_ptr, stride_x, res_ptr, stride_r, norm_w_ptr, res_out_ptr, h_ptr, gu_ptr, out_ptr, wgu_ptr, wd_ptr,
    part_gu_ptr, part_d_ptr, state_ptr,
    M, H, I, eps,  # noqa: E741 - I: the intermediate size, as in the GEMM shapes
    gu_tiles, gu_splits, gu_k_per_split, d_tiles, d_splits, d_k_per_split, n_programs,
    BLOCK_M: tl.constexpr, CHUNK_H: tl.constexpr, GU_N: tl.constexpr, GU_K: tl.constexpr, D_N: tl.constexpr,
    D_K: tl.constexpr, GU_EVEN_K: tl.constexpr, D_EVEN_K: tl.constexpr, INTERLEAVE: tl.constexpr,
    DEP_BLOCK: tl.constexpr, F32_DOT: tl.constexpr,
):
    queue = state_ptr
    left = state_ptr + 1
    normed = state_ptr + 2
    gu_flags = state_ptr + 3
    gu_tickets = gu_flags + gu_tiles
    d_tickets = gu_tickets + gu_tiles
    n_gu = gu_tiles * gu_splits
    n_items = M + n_gu + d_tiles * d_splits
    item = tl.atomic_add(queue, 1, sem="relaxed")
    while item < n_items:
        if item < M:
            _norm_row(x_ptr, stride_x, res_ptr, stride_r, norm_w_ptr, h_ptr, res_out_ptr, item, H, eps, CHUNK_H)
            tl.debug_barrier()
            tl.atomic_add(normed, 1, sem="release")
        elif item < M + n_gu:
            slot = (item - M) // gu_splits
            if INTERLEAVE:  # gate tile i, up tile i, gate tile i + 1, ...: down's K slices complete in order
                tile = slot // 2 + (slot % 2) * (gu_tiles // 2)
            else:
                tile = slot
            _wait_count(normed, M)
            done = _gemm_item(h_ptr, H, wgu_ptr, H, gu_ptr, 2 * I, part_gu_ptr, gu_tickets,
                              M, 2 * I, H, tile, (item - M) % gu_splits, gu_k_per_split, gu_splits,
                              BLOCK_M, GU_N, GU_K, GU_EVEN_K, False, F32_DOT)
            if done != 0:
                tl.debug_barrier()
                tl.atomic_add(gu_flags + tile, 1, sem="release")
        else:
            j = item - M - n_gu
            split = j // d_tiles
            k0 = split * d_k_per_split
            k1 = tl.minimum(k0 + d_k_per_split, I)
            _wait_flags(gu_flags, k0 // GU_N, (k1 + GU_N - 1) // GU_N, DEP_BLOCK)  # gate columns [k0, k1)
            _wait_flags(gu_flags, (I + k0) // GU_N, (I + k1 + GU_N - 1) // GU_N, DEP_BLOCK)  # up columns
            _gemm_item(gu_ptr, 2 * I, wd_ptr, I, out_ptr, H, part_d_ptr, d_tickets,
                       M, H, I, j % d_tiles, split, d_k_per_split, d_splits,
                       BLOCK_M, D_N, D_K, D_EVEN_K, True, F32_DOT)
        item = tl.atomic_add(queue, 1, sem="relaxed")
    # every item is taken; the last program to leave resets the queue and the flags for the next launch
    if tl.atomic_add(left, 1, sem="acq_rel") == n_programs - 1:
        tl.store(queue, 0)
        tl.store(left, 0)
        tl.store(normed, 0)
        for f0 in range(0, gu_tiles, 1024):
            idx = f0 + tl.arange(0, 1024)
            tl.store(gu_flags + idx, tl.zeros([1024], tl.int32), mask=idx < gu_tiles)


def _k_split(k: int, config: Config) -> tuple[int, int]:
    """(splits, K per split) as `triton_linear.linear` rounds them: no empty split, whole K blocks."""
    k_blocks = triton.cdiv(k, config.block_k)
    per = triton.cdiv(k_blocks, max(config.split_k, 1))
    return triton.cdiv(k_blocks, per), per * config.block_k


def check_inputs(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, w_gate_up: torch.Tensor,
                 w_down: torch.Tensor) -> tuple[int, int, int]:
    """(M, hidden, intermediate), or a ValueError naming what does not fit."""
    if x.dim() != 2 or residual.shape != x.shape or x.stride(1) != 1 or residual.stride(1) != 1:
        raise ValueError(f"x and residual must be the same [M, hidden] with contiguous rows, got {tuple(x.shape)} "
                         f"and {tuple(residual.shape)}")
    m, hidden = x.shape
    inter = w_down.shape[1] if w_down.dim() == 2 else -1
    if (w_gate_up.shape != (2 * inter, hidden) or w_down.shape != (hidden, inter) or norm_weight.shape != (hidden,)
            or not (w_gate_up.is_contiguous() and w_down.is_contiguous() and norm_weight.is_contiguous())):
        raise ValueError(f"weights must be contiguous gate_up [2I, {hidden}], down [{hidden}, I] and norm "
                         f"[{hidden}], got {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}, {tuple(norm_weight.shape)}")
    if not 0 < m <= MAX_M or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must have 1..{MAX_M} rows in bf16/fp16, got {m} rows of {x.dtype}")
    if any(t.dtype != x.dtype for t in (residual, norm_weight, w_gate_up, w_down)):
        raise ValueError("residual, norm weight and both GEMM weights must have x's dtype")
    if inter % 64:
        raise ValueError(f"intermediate size must be a multiple of 64 (whole cache lines per K slice), got {inter}")
    return m, hidden, inter


def mlp_block(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    plan: BlockPlan | None = None,
    *,
    intermediates: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(down(SiLU(gate) * up of RMSNorm(x + residual) * w), x + residual) in one launch; x, residual [M, hidden],
    w_gate_up [2I, hidden] (gate rows, then up rows), w_down [hidden, I]. intermediates=True also returns the normed
    input and gate_up output (tests)."""
    m, hidden, inter = check_inputs(x, residual, norm_weight, w_gate_up, w_down)
    plan = plan or default_plan(m, hidden, inter, x.device)
    gu_cfg, d_cfg = plan.gate_up, plan.down
    gu_tiles, d_tiles = triton.cdiv(2 * inter, gu_cfg.block_n), triton.cdiv(hidden, d_cfg.block_n)
    gu_splits, gu_kps = _k_split(hidden, gu_cfg)
    d_splits, d_kps = _k_split(inter, d_cfg)
    gu_floats = gu_splits * m * 2 * inter if gu_splits > 1 else 0
    d_floats = d_splits * m * hidden if d_splits > 1 else 0
    part, state = workspace(x.device, gu_floats + d_floats + 1, STATE_SLOTS + 2 * gu_tiles + d_tiles)
    h, out, res_out = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    gu = torch.empty(m, 2 * inter, dtype=x.dtype, device=x.device)
    _mlp_block_kernel[(plan.programs,)](
        x, x.stride(0), residual, residual.stride(0), norm_weight, res_out, h, gu, out, w_gate_up, w_down,
        part, part[gu_floats:], state,
        m, hidden, inter, eps,
        gu_tiles, gu_splits, gu_kps, d_tiles, d_splits, d_kps, plan.programs,
        BLOCK_M=block_m(m), CHUNK_H=min(NORM_CHUNK, triton.next_power_of_2(hidden)), GU_N=gu_cfg.block_n,
        GU_K=gu_cfg.block_k, D_N=d_cfg.block_n, D_K=d_cfg.block_k, GU_EVEN_K=hidden % gu_cfg.block_k == 0,
        D_EVEN_K=inter % d_cfg.block_k == 0, INTERLEAVE=inter % gu_cfg.block_n == 0,
        DEP_BLOCK=triton.next_power_of_2(triton.cdiv(d_kps, gu_cfg.block_n) + 1), F32_DOT=x.device.type != "cuda",
        num_warps=gu_cfg.num_warps, num_stages=gu_cfg.num_stages,
    )
    return (out, res_out, h, gu) if intermediates else (out, res_out)
