"""A decoder layer's work after attention in one persistent launch, an experiment towards a persistent decode layer
(issue 19): `mlp_block` = the post-attention residual add + RMSNorm, gate_up and down (3 launches in the engine
today); `layer_block` = o_proj, that, and the next layer's residual add + RMSNorm and qkv projection (6 launches).
`bench/mlp_block.py` measures both against the engine's kernels; the engine runs them only with
SPARROW_LAYER_BLOCK=mlp|chain (`engine/fused.py`), until an H200 run says they pay.

Why: at decode batch sizes every kernel of the step pays a ramp and a tail (1.8-5 us a boundary on an H200,
`bench/results/launch_boundary.json`), ~11 kernels a layer. Here a fixed grid of programs takes work items from
one queue (an atomic counter) in order: [o_proj tiles,] the M norm rows, the gate_up items (each streams the gate
rows and the up rows of the same columns and writes SiLU(gate) * up), the down tiles K slice by K slice[, the next
norm rows, the qkv tiles]. An item waits (spinning on flags or counters in L2) only for items earlier in the queue,
which programs already running hold, so no grid size can deadlock and the programs need not all be resident; down
tiles of the first K slices start while the last gate_up items still stream.

Same arithmetic as the engine's kernels: a norm row as `triton_fused._add_rms_norm_kernel` (up to float32
reduction order), a GEMM tile as `triton_linear._linear_kernel` (its device functions; split-K partials summed in
split order by the tile's last program), SiLU(gate) * up rounded as the down GEMM's fused load rounds it. The queue,
flags, counters and split tickets live in `triton_linear.workspace`'s counters, zero between launches: the last
program to leave resets what it used, so CUDA-graph replays need no memset. Reads of data another program wrote in
this launch happen only after its flag or counter, on cache lines no program of this launch read before (down's K
slices are whole 128-byte lines of act: `I % 64 == 0` is required).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels import triton_linear as tlin
from sparrow_sgl.attention.kernels.triton_fused import _round
from sparrow_sgl.attention.kernels.triton_linear import MAX_M, Config, block_m, fit_split, k_splits, num_sms, workspace
from sparrow_sgl.attention.kernels.triton_queue import signal, wait_count, wait_flags

NORM_CHUNK = 512  # columns of a norm row per step
# queue, programs that left, norm rows done, o tiles done, down tiles done, next norm rows done; then gate_up flags,
# gate_up / down / o / qkv split tickets
SLOTS = 6
STATE_SLOTS = tl.constexpr(SLOTS)  # the kernel's view of SLOTS


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """Tiles of the block's GEMMs (o_proj and the next qkv only where the block has them) and the persistent grid.
    All run in one kernel: one warp count and one pipeline depth (gate_up's)."""

    gate_up: Config
    down: Config
    programs: int
    o: Config | None = None
    qkv: Config | None = None


def default_plan(m: int, hidden: int, inter: int, device: torch.device, programs: int | None = None,
                 q_size: int = 0, qkv_size: int = 0, tile: tuple[int, int, int] = (64, 64, 3)) -> BlockPlan:
    """tile = (block_n, block_k, stages) for every stage, 4 warps; each GEMM split along K until its items cover
    the grid. q_size / qkv_size: plan the o_proj / next-qkv stages too. programs: as many as fit on the GPU at once
    (more only wait for a slot; fewer leave SMs idle): compiled for sm_90a by Triton 3.6 with 64 x 64 tiles in 3
    stages the kernel takes 125-165 registers and 60 KB of shared memory at M <= 32 (3 programs per SM),
    242-252 registers at M = 64 (2 per SM); 128-deep K tiles in 3 stages need 120 KB (1 per SM)."""
    programs = programs or (3 if m <= 32 else 2) * num_sms(device)
    block_n, block_k, stages = tile

    def plan(n: int, k: int) -> Config:
        return Config(block_n, block_k, fit_split(n, k, block_n, block_k, programs), 4, stages)

    return BlockPlan(plan(inter, hidden), plan(hidden, inter), programs, plan(hidden, q_size) if q_size else None,
                     plan(qkv_size, hidden) if qkv_size else None)


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
    n, m, w_rows, x_rows, k_start, k_end = tlin._tile_rows(x_ptr, stride_xm, w_ptr, stride_wn, M, N, K, tile, split,
                                                            k_per_split, BLOCK_M, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
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
        done = tlin._last_split(ticket_ptr + tile, n_splits)
        if done != 0:
            total = tlin._split_sum(part_ptr, offs, mask, M * N, n_splits)
            tlin._store_out(total, out_ptr, stride_om, out_ptr, n, m, M, N, False)
    return done


@triton.jit
def _store_act(acc_g, acc_u, act_ptr, n, m, M, I, F32_DOT: tl.constexpr):  # noqa: E741
    """act[m, n] = SiLU(gate) * up from the float32 gate / up sums, rounded as the chain rounds them: gate_up stored
    in the model dtype (`_store_out`), then SiLU and the product as `_x_tile` (SILU) computes them."""
    dtype = act_ptr.dtype.element_ty
    if F32_DOT:  # Triton's interpreter: `_store_out`'s conversion (it truncates there; `_round` would not)
        g = acc_g.to(dtype).to(tl.float32)
        u = acc_u.to(dtype).to(tl.float32)
    else:
        g = _round(acc_g, dtype)
        u = _round(acc_u, dtype)
    act = _round(_round(g / (1.0 + tl.exp(-g)), dtype) * u, dtype)
    tl.store(act_ptr + m[None, :] * I + n[:, None], act.to(dtype), mask=(n < I)[:, None] & (m < M)[None, :])


@triton.jit
def _gate_up_item(
    h_ptr, H, w_ptr, act_ptr, part_ptr, ticket_ptr, M, I, tile, split, k_per_split, n_splits,  # noqa: E741
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, F32_DOT: tl.constexpr,
):
    """Columns [tile * BLOCK_N, +BLOCK_N) of SiLU(h @ W_gate^T) * (h @ W_up^T): the gate rows and the up rows of
    gate_up streamed side by side (each as `_linear_kernel` computes its tile), so down reads act [M, I] plainly.
    1 if this program completed the tile (no split, or its last split to arrive)."""
    n, m, gate_rows, x_rows, k_start, k_end = tlin._tile_rows(h_ptr, H, w_ptr, H, M, I, H, tile, split, k_per_split,
                                                               BLOCK_M, BLOCK_N)
    up_rows = gate_rows + I.to(tl.int64) * H
    kk = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + kk
        x = tlin._x_tile(x_rows, k, H, EVEN_K, False)
        acc_g = tlin._dot(tlin._w_tile(gate_rows, k, H, EVEN_K), x, acc_g, F32_DOT)
        acc_u = tlin._dot(tlin._w_tile(up_rows, k, H, EVEN_K), x, acc_u, F32_DOT)
    done = tl.full([], 1, tl.int32)
    if n_splits == 1:
        _store_act(acc_g, acc_u, act_ptr, n, m, M, I, F32_DOT)
    else:
        mask = (n < I)[:, None] & (m < M)[None, :]
        offs = m[None, :] * (2 * I) + n[:, None]  # gate partials at n, up partials at I + n
        tl.store(part_ptr + split.to(tl.int64) * M * 2 * I + offs, acc_g, mask=mask)
        tl.store(part_ptr + split.to(tl.int64) * M * 2 * I + offs + I, acc_u, mask=mask)
        done = tlin._last_split(ticket_ptr + tile, n_splits)
        if done != 0:
            _store_act(tlin._split_sum(part_ptr, offs, mask, M * 2 * I, n_splits),
                       tlin._split_sum(part_ptr, offs + I, mask, M * 2 * I, n_splits), act_ptr, n, m, M, I, F32_DOT)
    return done


@triton.jit
def _gemm_stage(x_ptr, stride_xm, w_ptr, out_ptr, part_ptr, ticket_ptr, M, N, K, j, splits, k_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                F32_DOT: tl.constexpr):
    """Item j of a stage whose items are (tile, split) pairs, split fastest; 1 if it completed its tile."""
    return _gemm_item(x_ptr, stride_xm, w_ptr, K, out_ptr, N, part_ptr, ticket_ptr, M, N, K, j // splits, j % splits,
                      k_per_split, splits, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, False, F32_DOT)


@triton.jit
def _layer_block_kernel(
    attn_ptr, wo_ptr, x_ptr, stride_x, res_ptr, stride_r, norm_w_ptr, res_out_ptr, h_ptr, act_ptr, out_ptr,
    wgu_ptr, wd_ptr, norm2_w_ptr, res2_ptr, h2_ptr, wq_ptr, qkv_ptr, part_ptr, state_ptr,
    M, H, I, Q, NQ, eps, eps2,  # noqa: E741 - I: the intermediate size, as in the GEMM shapes
    o_tiles, o_splits, o_kps, gu_tiles, gu_splits, gu_kps, d_tiles, d_splits, d_kps, q_tiles, q_splits, q_kps,
    part_gu, part_d, part_q, n_programs,
    BLOCK_M: tl.constexpr, CHUNK_H: tl.constexpr, O_N: tl.constexpr, O_K: tl.constexpr, GU_N: tl.constexpr,
    GU_K: tl.constexpr, D_N: tl.constexpr, D_K: tl.constexpr, Q_N: tl.constexpr, Q_K: tl.constexpr,
    O_EVEN_K: tl.constexpr, GU_EVEN_K: tl.constexpr, D_EVEN_K: tl.constexpr, Q_EVEN_K: tl.constexpr,
    DEP_BLOCK: tl.constexpr, HAS_O: tl.constexpr, HAS_NEXT: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Stages in queue order: [o_proj tiles] -> norm rows -> gate_up tiles (SiLU(gate) * up) -> down tiles (K slice
    by K slice) -> [next norm rows -> next qkv tiles]. With HAS_O, x_ptr is o_proj's output (written here); the
    bracketed stages only with HAS_O / HAS_NEXT."""
    queue, left, normed, o_done, d_done, normed2 = (state_ptr + 0, state_ptr + 1, state_ptr + 2, state_ptr + 3,
                                                    state_ptr + 4, state_ptr + 5)
    gu_flags = state_ptr + STATE_SLOTS
    gu_tickets = gu_flags + gu_tiles
    d_tickets = gu_tickets + gu_tiles
    o_tickets = d_tickets + d_tiles
    q_tickets = o_tickets + o_tiles
    end_o = o_tiles * o_splits if HAS_O else 0
    end_norm = end_o + M
    end_gu = end_norm + gu_tiles * gu_splits
    end_d = end_gu + d_tiles * d_splits
    end_norm2 = end_d + M if HAS_NEXT else end_d
    n_items = end_norm2 + q_tiles * q_splits if HAS_NEXT else end_d
    item = tl.atomic_add(queue, 1, sem="relaxed")
    while item < n_items:
        if item < end_o:
            if HAS_O:  # (compiled only where the stage exists)
                done = _gemm_stage(attn_ptr, Q, wo_ptr, x_ptr, part_ptr, o_tickets, M, H, Q, item, o_splits, o_kps,
                                   BLOCK_M, O_N, O_K, O_EVEN_K, F32_DOT)
                if done != 0:
                    signal(o_done)
        elif item < end_norm:
            if HAS_O:
                wait_count(o_done, o_tiles)
            _norm_row(x_ptr, stride_x, res_ptr, stride_r, norm_w_ptr, h_ptr, res_out_ptr, item - end_o, H, eps,
                      CHUNK_H)
            signal(normed)
        elif item < end_gu:
            tile = (item - end_norm) // gu_splits
            wait_count(normed, M)
            done = _gate_up_item(h_ptr, H, wgu_ptr, act_ptr, part_ptr + part_gu, gu_tickets, M, I, tile,
                                 (item - end_norm) % gu_splits, gu_kps, gu_splits, BLOCK_M, GU_N, GU_K, GU_EVEN_K,
                                 F32_DOT)
            if done != 0:
                signal(gu_flags + tile)
        elif item < end_d:
            j = item - end_gu
            split = j // d_tiles
            k0 = split * d_kps
            k1 = tl.minimum(k0 + d_kps, I)
            wait_flags(gu_flags, k0 // GU_N, (k1 + GU_N - 1) // GU_N, DEP_BLOCK)  # act[:, k0:k1] is written
            done = _gemm_item(act_ptr, I, wd_ptr, I, out_ptr, H, part_ptr + part_d, d_tickets,
                              M, H, I, j % d_tiles, split, d_kps, d_splits, BLOCK_M, D_N, D_K, D_EVEN_K, False, F32_DOT)
            if HAS_NEXT:
                if done != 0:
                    signal(d_done)
        elif item < end_norm2:
            if HAS_NEXT:
                wait_count(d_done, d_tiles)
                _norm_row(out_ptr, H, res_out_ptr, H, norm2_w_ptr, h2_ptr, res2_ptr, item - end_d, H, eps2, CHUNK_H)
                signal(normed2)
        else:
            if HAS_NEXT:
                wait_count(normed2, M)
                _gemm_stage(h2_ptr, H, wq_ptr, qkv_ptr, part_ptr + part_q, q_tickets, M, NQ, H, item - end_norm2,
                            q_splits, q_kps, BLOCK_M, Q_N, Q_K, Q_EVEN_K, F32_DOT)
        item = tl.atomic_add(queue, 1, sem="relaxed")
    # every item is taken; the last program to leave resets the queue, counters and flags for the next launch
    if tl.atomic_add(left, 1, sem="acq_rel") == n_programs - 1:
        slots = tl.arange(0, 8)
        tl.store(state_ptr + slots, tl.zeros([8], tl.int32), mask=slots < STATE_SLOTS)
        for f0 in range(0, gu_tiles, 1024):
            idx = f0 + tl.arange(0, 1024)
            tl.store(gu_flags + idx, tl.zeros([1024], tl.int32), mask=idx < gu_tiles)


def _rows(t: torch.Tensor, name: str, m: int, cols: int, dtype: torch.dtype) -> None:
    if t.shape != (m, cols) or t.stride(1) != 1 or t.dtype != dtype:
        raise ValueError(f"{name} must be [{m}, {cols}] {dtype} with contiguous rows, got {tuple(t.shape)} {t.dtype}")


def _weight(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype) -> None:
    if t.shape != shape or not t.is_contiguous() or t.dtype != dtype:
        raise ValueError(f"{name} must be a contiguous {dtype} {list(shape)}, got {tuple(t.shape)} {t.dtype}")


def check_inputs(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, w_gate_up: torch.Tensor,
                 w_down: torch.Tensor) -> tuple[int, int, int]:
    """(M, hidden, intermediate), or a ValueError naming what does not fit."""
    if x.dim() != 2 or not 0 < x.shape[0] <= MAX_M or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be [M, hidden] with 1..{MAX_M} rows in bf16/fp16, got {tuple(x.shape)} {x.dtype}")
    (m, hidden), inter = x.shape, (w_down.shape[1] if w_down.dim() == 2 else -1)
    _rows(x, "x", m, hidden, x.dtype)
    _rows(residual, "residual", m, hidden, x.dtype)
    _weight(norm_weight, "the norm weight", (hidden,), x.dtype)
    _weight(w_gate_up, "gate_up", (2 * inter, hidden), x.dtype)
    _weight(w_down, "down", (hidden, inter), x.dtype)
    if inter % 64:
        raise ValueError(f"intermediate size must be a multiple of 64 (whole cache lines per K slice), got {inter}")
    return m, hidden, inter


@dataclass(frozen=True, slots=True)
class NextLayer:
    """What the block computes of the next layer: its input norm and qkv projection."""

    norm_weight: torch.Tensor
    eps: float
    w_qkv: torch.Tensor


def mlp_block(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, plan: BlockPlan | None = None, *, intermediates: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(down(SiLU(gate) * up of RMSNorm(x + residual) * w), x + residual) in one launch; x, residual [M, hidden],
    w_gate_up [2I, hidden] (gate rows, then up rows), w_down [hidden, I]. intermediates=True also returns the normed
    input and SiLU(gate) * up (tests)."""
    m, hidden, inter = check_inputs(x, residual, norm_weight, w_gate_up, w_down)
    b = _launch(x, residual, norm_weight, eps, w_gate_up, w_down, plan or default_plan(m, hidden, inter, x.device))
    return (b["out"], b["res"], b["h"], b["act"]) if intermediates else (b["out"], b["res"])


def layer_block(
    attn: torch.Tensor, w_o: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    w_gate_up: torch.Tensor, w_down: torch.Tensor, next_layer: NextLayer | None = None, plan: BlockPlan | None = None,
    *, intermediates: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
    """Everything of a decoder layer after its attention, in one launch: o_proj (attn [M, Q] @ w_o [hidden, Q]^T),
    the residual add + post-attention norm, the MLP, and with `next_layer` the next layer's residual add + input norm
    and qkv projection. Returns (next qkv, the next layer's residual stream s' + MLP output) with next_layer, else
    (MLP output, residual stream) like `mlp_block`; intermediates=True: every buffer by name (tests)."""
    if attn.dim() != 2 or w_o.dim() != 2:
        raise ValueError(f"attn must be [M, Q] and w_o [hidden, Q], got {tuple(attn.shape)}, {tuple(w_o.shape)}")
    m, q_size = attn.shape
    hidden = residual.shape[-1]
    _rows(attn, "attn", m, q_size, residual.dtype)
    _weight(w_o, "o_proj", (hidden, q_size), residual.dtype)
    y = torch.empty(m, hidden, dtype=attn.dtype, device=attn.device)
    m, hidden, inter = check_inputs(y, residual, norm_weight, w_gate_up, w_down)
    if next_layer is not None:
        _weight(next_layer.norm_weight, "the next norm weight", (hidden,), y.dtype)
        if next_layer.w_qkv.dim() != 2:
            raise ValueError(f"the next qkv weight must be [N, {hidden}], got {tuple(next_layer.w_qkv.shape)}")
        _weight(next_layer.w_qkv, "the next qkv weight", (next_layer.w_qkv.shape[0], hidden), y.dtype)
    plan = plan or default_plan(m, hidden, inter, y.device, q_size=q_size,
                                qkv_size=0 if next_layer is None else next_layer.w_qkv.shape[0])
    b = _launch(y, residual, norm_weight, eps, w_gate_up, w_down, plan, attn=attn, w_o=w_o, next_layer=next_layer)
    if intermediates:
        return b
    return (b["qkv"], b["res2"]) if next_layer is not None else (b["out"], b["res"])


def _launch(x, residual, norm_weight, eps, w_gate_up, w_down, plan: BlockPlan, attn=None, w_o=None,
            next_layer: NextLayer | None = None) -> dict[str, torch.Tensor]:
    """One launch of the kernel; with attn, x is o_proj's output buffer (written by the block)."""
    (m, hidden), inter = x.shape, w_down.shape[1]
    has_o, has_next = attn is not None, next_layer is not None
    if (has_o and plan.o is None) or (has_next and plan.qkv is None):
        raise ValueError("the plan has no tiles for o_proj / the next qkv: build it with default_plan(q_size=, "
                         "qkv_size=)")
    q_size = attn.shape[1] if has_o else 0
    n_qkv = next_layer.w_qkv.shape[0] if has_next else 0
    stages = {"o": (plan.o, hidden, q_size, has_o), "gu": (plan.gate_up, inter, hidden, True),
              "d": (plan.down, hidden, inter, True), "q": (plan.qkv, n_qkv, hidden, has_next)}
    tiles, splits, kps, floats, offsets = {}, {}, {}, {}, {}
    total = 0
    for name, (cfg, n, k, used) in stages.items():
        if not used:
            tiles[name], splits[name], kps[name], floats[name] = 0, 1, 0, 0
            cfg = Config(64, 128, 1, 4, 3)
        else:
            tiles[name], (splits[name], kps[name]) = triton.cdiv(n, cfg.block_n), k_splits(k, cfg)
            floats[name] = splits[name] * m * n * (2 if name == "gu" else 1) if splits[name] > 1 else 0
        offsets[name], total = total, total + floats[name]
        stages[name] = cfg
    part, state = workspace(x.device, total + 1, SLOTS + 2 * tiles["gu"] + sum(tiles[s] for s in "odq"))
    buf = {"h": torch.empty_like(x), "out": torch.empty_like(x), "res": torch.empty_like(x),
           "act": torch.empty(m, inter, dtype=x.dtype, device=x.device)}
    if has_o:
        buf["y"] = x
    if has_next:
        buf |= {"h2": torch.empty_like(x), "res2": torch.empty_like(x),
                "qkv": torch.empty(m, n_qkv, dtype=x.dtype, device=x.device)}
    o, gu, d, q = (stages[s] for s in ("o", "gu", "d", "q"))
    dummy = x
    _layer_block_kernel[(plan.programs,)](
        attn if has_o else dummy, w_o if has_o else dummy, x, x.stride(0), residual, residual.stride(0), norm_weight,
        buf["res"], buf["h"], buf["act"], buf["out"], w_gate_up, w_down,
        next_layer.norm_weight if has_next else dummy, buf.get("res2", dummy), buf.get("h2", dummy),
        next_layer.w_qkv if has_next else dummy, buf.get("qkv", dummy), part, state,
        m, hidden, inter, q_size, n_qkv, eps, next_layer.eps if has_next else eps,
        tiles["o"], splits["o"], kps["o"], tiles["gu"], splits["gu"], kps["gu"], tiles["d"], splits["d"], kps["d"],
        tiles["q"], splits["q"], kps["q"], offsets["gu"], offsets["d"], offsets["q"], plan.programs,
        BLOCK_M=block_m(m), CHUNK_H=min(NORM_CHUNK, triton.next_power_of_2(hidden)),
        O_N=o.block_n, O_K=o.block_k, GU_N=gu.block_n, GU_K=gu.block_k, D_N=d.block_n, D_K=d.block_k,
        Q_N=q.block_n, Q_K=q.block_k, O_EVEN_K=not has_o or q_size % o.block_k == 0,
        GU_EVEN_K=hidden % gu.block_k == 0, D_EVEN_K=inter % d.block_k == 0, Q_EVEN_K=hidden % q.block_k == 0,
        DEP_BLOCK=triton.next_power_of_2(triton.cdiv(kps["d"], gu.block_n) + 1),
        HAS_O=has_o, HAS_NEXT=has_next, F32_DOT=x.device.type != "cuda",
        num_warps=gu.num_warps, num_stages=gu.num_stages,
    )
    return buf
