"""The decoder's elementwise chains as single ops: fused Triton kernels on CUDA, the plain torch math elsewhere.

The torch versions are the reference (the same ops, in the same order, as transformers' Qwen3): CPU always runs
them, and so does CUDA with SPARROW_FUSED_OPS=0 or without Triton. On CUDA the Triton kernels
(`attention/kernels/triton_fused.py`) replace ~50 small launches per layer with 4, which matters because a decode
step at rollout batch sizes is latency-bound, and they are allocation-light and sync-free, so CUDA graphs capture
them. The switch is read at call time: a captured graph keeps whatever was active when it was captured.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

FUSED_ENV = "SPARROW_FUSED_OPS"
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_fused(x: torch.Tensor) -> bool:
    """Fused kernels for CUDA tensors when Triton is installed, unless SPARROW_FUSED_OPS=0."""
    return x.is_cuda and _HAS_TRITON and os.environ.get(FUSED_ENV, "1").strip() != "0"


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s) * weight, s) with s = x + residual (s = x when residual is None), for x [T, hidden]."""
    if use_fused(x) and weight.dtype == x.dtype:
        from sparrow_sgl.attention.kernels.triton_fused import add_rms_norm as fused

        return fused(x, residual, weight, eps)
    s = x if residual is None else x + residual
    return rms_norm_ref(s, weight, eps), s


def use_fused_qk(qkv: torch.Tensor, q_weight: torch.Tensor) -> bool:
    """Whether `qk_norm_rope` runs the Triton kernel (what the decode step's fused KV append must match)."""
    head_dim = q_weight.shape[0]
    return use_fused(qkv) and head_dim >= 4 and not head_dim & (head_dim - 1) and q_weight.dtype == qkv.dtype


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
    """qkv [T, (heads + 2 kv_heads) * D] -> q, k (per-head RMSNorm * weight, then rotary) and v, each [T, h, D]."""
    head_dim = q_weight.shape[0]
    if use_fused_qk(qkv, q_weight):
        from sparrow_sgl.attention.kernels.triton_fused import qk_norm_rope as fused

        return fused(qkv, q_weight, k_weight, eps, cos, sin, heads, kv_heads)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = rms_norm_ref(q.view(-1, heads, head_dim), q_weight, eps)
    k = rms_norm_ref(k.view(-1, kv_heads, head_dim), k_weight, eps)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.view(-1, kv_heads, head_dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2I] with the gate first."""
    if use_fused(gate_up):
        from sparrow_sgl.attention.kernels.triton_fused import silu_mul as fused

        return fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
