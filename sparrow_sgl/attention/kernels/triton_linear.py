"""Small-M linear layer in Triton: out[M, N] = x[M, K] @ W[N, K]^T (+ bias) for the decode step's GEMMs (M <= 64).

At decode batch sizes a GEMM is a read of its weights, and cuBLAS leaves ~5 us of ramp-up and tail per launch at
M = 32-64 (bench/results/NOTES.md, phase 5: 0.62-0.83 of the weight-bytes floor over the layer stack, o_proj
0.31-0.57). This kernel streams W with many programs: grid (N tiles, K splits) sized to cover several waves of the
SMs, each program a [BLOCK_N, BLOCK_K] weight stream times x^T (the weight tile is the MMA's M side, so M = 16..64
rows of x fit its N side). With split-K the reduction happens in the same launch, the pattern of
`triton_select.py`: each program stores its float32 partial tile to a workspace, takes a ticket from its output
tile's counter (atomic, acq_rel); the last of the tile's programs to arrive sums the partials in split order (the
same order whoever arrives last: deterministic), adds the bias, writes the output and resets the counter to 0, so
CUDA-graph replays need no memset. No host sync; the workspace is allocated (and only grown, never freed: captured
graphs keep pointers into it) by the caching allocator, normally before any capture.

`silu_input=True` fuses the MLP's SiLU x up into the load of x: the input is gate_up [M, 2K] and the kernel
multiplies by A = SiLU(gate) * up rounded exactly like `triton_fused.silu_mul` (SiLU in float32, rounded to the
dtype, times up, rounded), so the separate launch disappears. `pdl=True` launches with programmatic dependent
launch (sm_90+, `pdl.py`): each program loads its first weight tile, then waits for the previous kernel and
releases its own dependents, so the weight stream starts during the previous kernel's tail; everything that reads
the previous kernel's output (x) or writes (partials, counters, output) comes after the wait. Where that extra tile
does not fit in shared memory beside the pipeline (e.g. 128 x 256 tiles in 2 stages: 256 KiB), the program waits
first and loads nothing early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from sparrow_sgl.attention.kernels.pdl import gdc_wait, launch_options, pdl_enter
from sparrow_sgl.attention.kernels.triton_fused import _round

MAX_M = 64
MAX_WORKSPACE_BYTES = 64 * 2**20  # float32 partials of one call; configs that need more are not candidates
# (BLOCK_N, BLOCK_K, num_warps, num_stages): the weight tile streamed per loop step and its pipeline depth. Every
# program also reads its x slice from L2 (tiles x M x K x 2 bytes in all), so wider weight tiles pay less for x;
# narrower ones fit 2-3 programs per SM (shared memory) and start more streams; 256-wide K steps keep more bytes in
# flight per program (the small-N o/down projections run few programs). The first is the untimed default.
TILES = ((64, 128, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4), (256, 64, 8, 3), (64, 64, 4, 4),
         (32, 256, 4, 4), (64, 256, 4, 3), (128, 256, 8, 2), (32, 128, 4, 4))
MAX_SPLIT = 16  # K splits of a candidate; the last program of a tile reads split x BLOCK_N x M x 4 bytes
MAX_PROGRAMS_PER_SM = 8  # candidates' grids stay below this many programs per SM (split 1 always qualifies)


@dataclass(frozen=True, slots=True)
class Config:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _w_tile(w_rows, k, K, EVEN_K: tl.constexpr):
    """W[n, k] as [BLOCK_N, BLOCK_K]; rows are pre-clamped to N - 1, so only a ragged K needs a mask."""
    if EVEN_K:
        return tl.load(w_rows + k[None, :])
    else:
        return tl.load(w_rows + k[None, :], mask=k[None, :] < K, other=0.0)


@triton.jit
def _x_tile(x_rows, k, K, EVEN_K: tl.constexpr, SILU: tl.constexpr):
    """x[m, k]^T as [BLOCK_K, BLOCK_M]; SILU: x = gate_up, A = round(round(silu(gate)) * up), up K columns on."""
    if EVEN_K:
        a = tl.load(x_rows + k[:, None])
    else:
        a = tl.load(x_rows + k[:, None], mask=k[:, None] < K, other=0.0)
    if SILU:
        dtype = a.dtype
        if EVEN_K:
            up = tl.load(x_rows + K + k[:, None]).to(tl.float32)
        else:
            up = tl.load(x_rows + K + k[:, None], mask=k[:, None] < K, other=0.0).to(tl.float32)
        gate = a.to(tl.float32)
        act = _round(gate / (1.0 + tl.exp(-gate)), dtype)
        a = _round(act * up, dtype).to(dtype)
    return a


@triton.jit
def _dot(w, x, acc, F32_DOT: tl.constexpr):
    if F32_DOT:  # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits; float32 is exact here
        return tl.dot(w.to(tl.float32), x.to(tl.float32), acc)
    else:
        return tl.dot(w, x, acc)


@triton.jit
def _store_out(acc, out_ptr, stride_om, b_ptr, n, m, M, N, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] float32 (+ bias) -> out[m, n] in out's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    mask = (n < N)[:, None] & (m < M)[None, :]
    tl.store(out_ptr + m[None, :] * stride_om + n[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_splits"])  # one compile serves split-K 1 and > 1
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, counter_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, k_per_split, n_splits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, PDL: tl.constexpr, EARLY_W: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    # clamped rows: the weight stream needs no mask; rows past N or M are computed and dropped at the store
    w_rows = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + tl.minimum(m, M - 1).to(tl.int64)[None, :] * stride_xm
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if EARLY_W:
        w = _w_tile(w_rows, k_start + kk, K, EVEN_K)  # weights do not depend on the previous kernel
        pdl_enter(PDL)
        acc = _dot(w, _x_tile(x_rows, k_start + kk, K, EVEN_K, SILU), acc, F32_DOT)
        k_start += BLOCK_K
    else:
        pdl_enter(PDL)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + kk
        acc = _dot(_w_tile(w_rows, k, K, EVEN_K), _x_tile(x_rows, k, K, EVEN_K, SILU), acc, F32_DOT)
    if n_splits == 1:
        _store_out(acc, out_ptr, stride_om, b_ptr, n, m, M, N, HAS_BIAS)
    else:
        mask = (n < N)[:, None] & (m < M)[None, :]
        offs = m[None, :] * N + n[:, None]
        tl.store(part_ptr + split.to(tl.int64) * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        ticket = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if ticket == n_splits - 1:  # the tile's last program: every partial is written
            tl.store(counter_ptr + tile, 0)  # ready for the next launch (graph replay)
            tl.debug_barrier()
            # .cg: read at L2, where the other programs stored (never a stale L1 line)
            total = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, n_splits):
                total += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            _store_out(total, out_ptr, stride_om, b_ptr, n, m, M, N, HAS_BIAS)


def block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def fit_split(n: int, k: int, block_n: int, block_k: int, programs: int) -> int:
    """K splits so that cdiv(n, block_n) * splits >= programs, every split non-empty and whole K blocks."""
    k_blocks = triton.cdiv(k, block_k)
    split = min(max(triton.cdiv(programs, triton.cdiv(n, block_n)), 1), k_blocks)
    return triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))


def workspace_bytes(m: int, n: int, config: Config) -> int:
    return 0 if config.split_k == 1 else config.split_k * m * n * 4


def candidates(m: int, n: int, k: int, device: torch.device) -> list[Config]:
    """The configs timed for one shape: every tile at every distinct split-K up to MAX_SPLIT whose grid has at
    most MAX_PROGRAMS_PER_SM programs per SM. Splits are runtime arguments, so a tile compiles once per shape class;
    timing a candidate costs ~0.2 ms, and which split balances the SMs best is hard to predict."""
    out = []
    for block_n, block_k, warps, stages in TILES:
        tiles, k_blocks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
        for split in sorted({triton.cdiv(k_blocks, per) for per in range(1, k_blocks + 1)}):
            config = Config(block_n, block_k, split, warps, stages)
            small = split == 1 or (split <= MAX_SPLIT and tiles * split <= MAX_PROGRAMS_PER_SM * num_sms(device))
            if small and workspace_bytes(m, n, config) <= MAX_WORKSPACE_BYTES:
                out.append(config)
    return out


def default_config(m: int, n: int, k: int, device: torch.device) -> Config:
    """The untimed choice (SPARROW_LINEAR=triton): the first tile, about 2 programs per SM."""
    block_n, block_k, warps, stages = TILES[0]
    split = fit_split(n, k, block_n, block_k, 2 * num_sms(device))
    while split > 1 and workspace_bytes(m, n, Config(block_n, block_k, split, warps, stages)) > MAX_WORKSPACE_BYTES:
        split = fit_split(n, k, block_n, block_k, triton.cdiv(n, block_n) * (split - 1))
    return Config(block_n, block_k, split, warps, stages)


_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_NO_EARLY_W: set[tuple] = set()  # PDL launches whose early weight tile exceeded shared memory
_RETIRED: list[torch.Tensor] = []  # outgrown workspaces: a captured graph may still point into them


def workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 partials >= floats, int32 counters >= tiles, zero) of `device`, shared by every call on it (these
    GEMMs and `triton_sample.py`): calls run in stream order (a PDL launch touches neither before its wait)."""
    part, counters = _WORKSPACE.get(device, (None, None))
    if part is None or part.numel() < floats:
        _RETIRED.extend([part] if part is not None else [])
        part = torch.empty(max(floats, 2**20), dtype=torch.float32, device=device)
    if counters is None or counters.numel() < tiles:
        _RETIRED.extend([counters] if counters is not None else [])
        counters = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    _WORKSPACE[device] = part, counters
    return part, counters


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
    *,
    silu_input: bool = False,
    pdl: bool = False,
) -> torch.Tensor:
    """x [M, K] (silu_input: gate_up [M, 2K]) @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, M <= 64."""
    n, k = weight.shape
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != (2 * k if silu_input else k) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"x must be [M, {2 * k if silu_input else k}] and weight [N, K] with contiguous rows, "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if m > MAX_M or x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise ValueError(f"x must have <= {MAX_M} rows in bf16/fp16 and weight its dtype, got {m} rows, "
                         f"{x.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{n}], got {tuple(bias.shape)}")
    if pdl and gdc_wait is None:
        raise ValueError("pdl=True needs triton.language.extra.cuda.gdc_wait (triton >= 3.4)")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    config = config or default_config(m, n, k, x.device)
    tiles, k_blocks = triton.cdiv(n, config.block_n), triton.cdiv(k, config.block_k)
    blocks_per_split = triton.cdiv(k_blocks, max(config.split_k, 1))
    split = triton.cdiv(k_blocks, blocks_per_split)  # no empty split (the PDL prologue loads a first tile)
    k_per_split = blocks_per_split * config.block_k
    part, counters = workspace(x.device, split * m * n if split > 1 else 0, tiles if split > 1 else 0)
    shape = dict(BLOCK_M=block_m(m), BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
                 HAS_BIAS=bias is not None, SILU=silu_input, PDL=pdl, F32_DOT=x.device.type != "cuda",
                 num_warps=config.num_warps, num_stages=config.num_stages)
    early_w = pdl and (config, tuple(shape.values())) not in _NO_EARLY_W
    while True:
        try:
            _linear_kernel[(tiles, split)](
                x, weight, bias if bias is not None else out, out, part, counters,
                m, n, k, x.stride(0), weight.stride(0), out.stride(0), k_per_split, split,
                EARLY_W=early_w, **shape, **launch_options(pdl),
            )
            return out
        except OutOfResources:  # raised before the launch: the early weight tile does not fit beside the pipeline
            if not early_w:
                raise
            _NO_EARLY_W.add((config, tuple(shape.values())))
            early_w = False
