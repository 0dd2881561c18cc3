"""Fused elementwise kernels of the Qwen3 decoder (one launch each instead of ~8): residual add + RMSNorm,
q/k RMSNorm + rotary, SiLU(gate) x up.

Each kernel rounds where the unfused torch code (and transformers) rounds in the model dtype, so a bf16 model
gives the same values up to float32 reduction order and libdevice's exp/rsqrt: the add, the normalised value, the
weight product, each rotary product and their sum, SiLU and its product with up are each rounded to the input
dtype (`_round`). No allocation beyond the outputs, no host sync: safe inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels.pdl import launch_options, pdl_enter, pdl_on


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """float32 x rounded to the model dtype (to nearest even) and back to float32, where torch stores an
    intermediate. bf16 rounds with integer ops: the compiler drops a plain `.to(bf16).to(fp32)` round trip of a
    product of bf16 values and fuses it into an FMA (seen on an H100, triton 3.6), and Triton's interpreter
    truncates instead of rounding. Finite inputs (a NaN payload may round to inf)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x.to(dtype), mask=mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, _round(w * _round(x * rstd, dtype), dtype).to(dtype), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x [T, hidden]; residual None -> (RMSNorm(x) * weight, x)."""
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"x must be [T, {weight.shape[0]}] with contiguous rows, got {tuple(x.shape)}")
    if weight.dtype != x.dtype or (residual is not None and (residual.shape != x.shape or residual.stride(1) != 1)):
        raise ValueError("weight must have x's dtype and residual x's shape (contiguous rows)")
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if x.shape[0]:
        res = residual if residual is not None else x
        block, pdl = triton.next_power_of_2(x.shape[1]), pdl_on(x.device)
        _add_rms_norm_kernel[(x.shape[0],)](
            x, res, weight, out, res_out,
            x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            x.shape[1], eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl, num_warps=min(16, max(1, block // 512)),
            **launch_options(pdl),
        )
    return out, res_out


@triton.jit
def _norm_rope(src, w_ptr, cos_ptr, sin_ptr, eps, head_dim, HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr):
    """One head vector: RMSNorm * weight, then rotary (x * cos + rotate_half(x) * sin), rounding like torch; the
    result is float32 holding a DTYPE value. Shared with `triton_qkv_append.py`, which must round identically.

    The norm is computed exactly as in `_add_rms_norm_kernel` (whole-vector sum, division by a runtime length);
    rotate_half's partner of lane d is lane (d + D/2) mod D, normalised the same way, negated in the first half."""
    d = tl.arange(0, HEAD_DIM)
    partner = (d + HEAD_DIM // 2) % HEAD_DIM
    x = tl.load(src + d).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / head_dim + eps)
    n = _round(tl.load(w_ptr + d).to(tl.float32) * _round(x * rstd, DTYPE), DTYPE)
    xp = tl.load(src + partner).to(tl.float32)
    n_partner = _round(tl.load(w_ptr + partner).to(tl.float32) * _round(xp * rstd, DTYPE), DTYPE)
    rotated = tl.where(d < HEAD_DIM // 2, -n_partner, n_partner)
    cos = tl.load(cos_ptr + d).to(tl.float32)
    sin = tl.load(sin_ptr + d).to(tl.float32)
    y = _round(n * cos, DTYPE) + _round(rotated * sin, DTYPE)
    return _round(y, DTYPE)


@triton.jit
def _norm_rope_head(src, w_ptr, cos_ptr, sin_ptr, dst, eps, head_dim, HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr):
    y = _norm_rope(src, w_ptr, cos_ptr, sin_ptr, eps, head_dim, HEAD_DIM, DTYPE)
    tl.store(dst + tl.arange(0, HEAD_DIM), y.to(DTYPE))


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, stride_t, qw_ptr, kw_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin,
    q_ptr, k_ptr, eps, head_dim,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    src = qkv_ptr + t * stride_t + h * HEAD_DIM  # k heads follow the q heads in a qkv row
    cos_row = cos_ptr + t * stride_cos
    sin_row = sin_ptr + t * stride_sin
    if h < HEADS:
        dst = q_ptr + (t * HEADS + h) * HEAD_DIM
        _norm_rope_head(src, qw_ptr, cos_row, sin_row, dst, eps, head_dim, HEAD_DIM, dtype)
    else:
        dst = k_ptr + (t * KV_HEADS + h - HEADS) * HEAD_DIM
        _norm_rope_head(src, kw_ptr, cos_row, sin_row, dst, eps, head_dim, HEAD_DIM, dtype)


def check_qkv(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, heads: int, kv_heads: int) -> None:
    """The contract of a qkv GEMM output, its norm weights and rotary rows (shared with `triton_qkv_append.py`)."""
    head_dim, tokens = q_weight.shape[0], qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (heads + 2 * kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [T, {(heads + 2 * kv_heads) * head_dim}] with contiguous rows, "
                         f"got {tuple(qkv.shape)}")
    if head_dim & (head_dim - 1) or head_dim < 4:
        raise ValueError(f"head_dim must be a power of two >= 4 for the Triton kernel, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (tokens, head_dim) or t.stride(1) != 1 or t.dtype != qkv.dtype:
            raise ValueError(f"{name} must be [{tokens}, {head_dim}] {qkv.dtype}, got {t.dtype} {tuple(t.shape)}")
    if k_weight.shape != (head_dim,) or q_weight.dtype != qkv.dtype or k_weight.dtype != qkv.dtype:
        raise ValueError(f"q/k norm weights must be [{head_dim}] in {qkv.dtype}")


def qk_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split qkv [T, (heads + 2 kv_heads) * D] -> q [T, heads, D], k [T, kv_heads, D] (normed, rotated, contiguous)
    and v [T, kv_heads, D] (a view); cos/sin [T, D] in qkv's dtype."""
    head_dim, tokens = q_weight.shape[0], qkv.shape[0]
    check_qkv(qkv, q_weight, k_weight, cos, sin, heads, kv_heads)
    q = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    if tokens:
        _qk_norm_rope_kernel[(tokens, heads + kv_heads)](
            qkv, qkv.stride(0), q_weight, k_weight, cos, sin, cos.stride(0), sin.stride(0), q, k, eps, head_dim,
            HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, num_warps=1 if head_dim <= 128 else 2,
        )
    return q, k, v


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_t, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gu_ptr + t * stride_t + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + t * stride_t + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + t * stride_o + cols, _round(act * up, dtype).to(dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2I] (gate first) -> [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [T, 2I] with contiguous rows, got {tuple(gate_up.shape)}")
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        block, pdl = min(1024, triton.next_power_of_2(inter)), pdl_on(gate_up.device)
        _silu_mul_kernel[(tokens, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, PDL=pdl, num_warps=4,
            **launch_options(pdl),
        )
    return out
