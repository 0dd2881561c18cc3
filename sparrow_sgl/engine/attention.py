"""Paged attention layer: writes the step's K/V (and page summaries) into the cache, then attends.

Prefill attends densely and causally over each sequence's whole cached KV (a cached prefix included); decode calls
the block-sparse `sparse_decode` with each request's budget. The layer holds its slice of the KV pool (bound by the
model runner); everything step-specific comes from the `Context`. The model calls `forward_qkv` with its qkv
projection: q/k norm + rotary, then `forward`, except in the CUDA decode step, which fuses them with the KV append.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparrow_sgl.attention import PageSummaries, sparse_decode
from sparrow_sgl.engine import fused
from sparrow_sgl.engine.context import Context, get_context


class PagedAttention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # [num_pages, kv_heads, page_size, head_dim] (HND), bound by KVCache.bind
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.summaries: PageSummaries | None = None

    def forward_qkv(self, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The layer on the qkv projection [T, (q_heads + 2 kv_heads) * head_dim]: per-head q/k RMSNorm and rotary,
        then `forward`. The CUDA decode step does the norm, rotary and KV append in one kernel instead."""
        context = get_context()
        if context.gpu is not None:
            return context.gpu.attend_qkv(self, qkv, q_weight, k_weight, eps, cos, sin)
        q, k, v = fused.qk_norm_rope(qkv, q_weight, k_weight, eps, cos, sin, self.num_heads, self.num_kv_heads)
        return self.forward(q, k, v)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, q_heads, head_dim], k/v [T, kv_heads, head_dim] for the step's new tokens -> [T, q_heads, head_dim]."""
        context = get_context()
        if context.gpu is not None:  # CUDA decode step: fused KV append + summaries, kernels (engine/cuda_graph.py)
            return context.gpu.attend(self, q, k, v)
        self._store(context, k, v)
        return self._prefill(context, q) if context.is_prefill else self._decode(context, q)

    def _store(self, context: Context, k: torch.Tensor, v: torch.Tensor) -> None:
        pages, offsets = context.slot_pages, context.slot_offsets
        self.k_cache[pages, :, offsets] = k.to(self.k_cache.dtype)
        self.v_cache[pages, :, offsets] = v.to(self.v_cache.dtype)
        self.summaries.append(pages, offsets, k)

    def _prefill(self, context: Context, q: torch.Tensor) -> torch.Tensor:
        page_size = context.sparsity.page_size
        out = torch.empty_like(q)
        start = 0
        for i, (n_new, kv_len) in enumerate(zip(context.query_lens, context.prefill_kv_lens)):
            n_pages = -(-kv_len // page_size)
            pages = context.block_tables[i, :n_pages]
            keys = self._gather(self.k_cache, pages, kv_len)
            values = self._gather(self.v_cache, pages, kv_len)
            query = q[start : start + n_new].transpose(0, 1)[None]
            mask = None
            if kv_len != n_new:  # a cached prefix: query j sits at position kv_len - n_new + j
                q_pos = torch.arange(kv_len - n_new, kv_len, device=q.device)
                mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(
                query,
                keys[None],
                values[None],
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scale,
                enable_gqa=True,
            )
            out[start : start + n_new] = o[0].transpose(0, 1)
            start += n_new
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
        """[kv_heads, length, head_dim] of one sequence from its pages."""
        blocks = cache[pages]  # [n_pages, kv_heads, page_size, head_dim]
        return blocks.transpose(0, 1).flatten(1, 2)[:, :length]

    def _decode(self, context: Context, q: torch.Tensor) -> torch.Tensor:
        out, selection = sparse_decode(
            q,
            self.k_cache,
            self.v_cache,
            context.block_tables,
            context.seq_lens,
            context.budgets,
            context.sparsity,
            layer=self.layer_idx,
            summaries=self.summaries,
            scale=self.scale,
            return_selection=True,
        )
        if not context.sparsity.is_dense_layer(self.layer_idx):
            attended = selection.attended_tokens(context.seq_lens, context.sparsity.page_size)
            context.attended_tokens += attended.float().mean(-1)
        return out
