"""Fused elementwise kernels of the Qwen3 decoder (one launch each instead of ~8): residual add + RMSNorm,
q/k RMSNorm + rotary, SiLU(gate) x up.

Each kernel rounds where the unfused torch code (and transformers) rounds in the model dtype, so a bf16 model
gives the same values up to float32 reduction order and libdevice's exp/rsqrt: the add, the normalised value, the
weight product, each rotary product and their sum, SiLU and its product with up are all stored-then-reloaded in
the input dtype. No allocation beyond the outputs, no host sync: safe inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x rounded to the model dtype and back to float32 (where torch would store an intermediate)."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
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
    tl.store(out_ptr + row * stride_o + cols, (w * _round(x * rstd, dtype)).to(dtype), mask=mask)


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
        block = triton.next_power_of_2(x.shape[1])
        _add_rms_norm_kernel[(x.shape[0],)](
            x, res, weight, out, res_out,
            x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            x.shape[1], eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        )
    return out, res_out


@triton.jit
def _norm_rope_head(src, w_ptr, cos_ptr, sin_ptr, dst, eps, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """One head vector: RMSNorm * weight, then rotary (x * cos + rotate_half(x) * sin), rounding like torch."""
    d = tl.arange(0, HALF)
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
    x1 = _round(tl.load(w_ptr + d).to(tl.float32) * _round(x1 * rstd, DTYPE), DTYPE)
    x2 = _round(tl.load(w_ptr + HALF + d).to(tl.float32) * _round(x2 * rstd, DTYPE), DTYPE)
    c1 = tl.load(cos_ptr + d).to(tl.float32)
    c2 = tl.load(cos_ptr + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + d).to(tl.float32)
    s2 = tl.load(sin_ptr + HALF + d).to(tl.float32)
    y1 = _round(x1 * c1, DTYPE) + _round(-x2 * s1, DTYPE)
    y2 = _round(x2 * c2, DTYPE) + _round(x1 * s2, DTYPE)
    tl.store(dst + d, y1.to(DTYPE))
    tl.store(dst + HALF + d, y2.to(DTYPE))


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, stride_t, qw_ptr, kw_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin,
    q_ptr, k_ptr, eps,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    src = qkv_ptr + t * stride_t + h * HEAD_DIM  # k heads follow the q heads in a qkv row
    cos, sin = cos_ptr + t * stride_cos, sin_ptr + t * stride_sin
    if h < HEADS:
        _norm_rope_head(src, qw_ptr, cos, sin, q_ptr + (t * HEADS + h) * HEAD_DIM, eps, HEAD_DIM // 2, dtype)
    else:
        dst = k_ptr + (t * KV_HEADS + h - HEADS) * HEAD_DIM
        _norm_rope_head(src, kw_ptr, cos, sin, dst, eps, HEAD_DIM // 2, dtype)


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
    head_dim = q_weight.shape[0]
    tokens = qkv.shape[0]
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
    q = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    if tokens:
        _qk_norm_rope_kernel[(tokens, heads + kv_heads)](
            qkv, qkv.stride(0), q_weight, k_weight, cos, sin, cos.stride(0), sin.stride(0), q, k, eps,
            HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, num_warps=1 if head_dim <= 128 else 2,
        )
    return q, k, v


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_t, stride_o, n_cols, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gu_ptr + t * stride_t + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + t * stride_t + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + t * stride_o + cols, (act * up).to(dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2I] (gate first) -> [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [T, 2I] with contiguous rows, got {tuple(gate_up.shape)}")
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(tokens, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4,
        )
    return out
