"""Attention of each query head over the tokens of its group's selected KV pages: the PyTorch reference that
`decode.sparse_decode` runs on CPU and the kernels' fallback (`kernels/dispatch.py`) runs on CUDA."""

from __future__ import annotations

import math

import torch

from sparrow_sgl.attention.pages import to_hnd
from sparrow_sgl.attention.select import Selection
from sparrow_sgl.config import SparsityConfig


def attend_pages(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: Selection,
    cfg: SparsityConfig,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each query head over the tokens of its group's selected pages."""
    batch, q_heads, head_dim = q.shape
    k_hnd, v_hnd = to_hnd(k_cache, cfg), to_hnd(v_cache, cfg)
    kv_heads, page_size = k_hnd.shape[1], k_hnd.shape[2]
    pages = selection.pages.expand(batch, kv_heads, -1)
    valid = selection.valid.expand(batch, kv_heads, -1)
    n_sel = pages.shape[-1]
    physical = block_table.long().gather(1, pages.reshape(batch, -1)).view(batch, kv_heads, n_sel).clamp(min=0)
    heads = torch.arange(kv_heads, device=q.device)[None, :, None]
    keys = k_hnd[physical, heads].reshape(batch, kv_heads, n_sel * page_size, head_dim).float()
    values = v_hnd[physical, heads].reshape(batch, kv_heads, n_sel * page_size, head_dim).float()
    positions = (pages[..., None] * page_size + torch.arange(page_size, device=q.device)).flatten(-2)
    mask = valid.repeat_interleave(page_size, dim=-1) & (positions < seq_lens.to(q.device)[:, None, None])
    qg = q.float().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    logits = torch.einsum("bhgd,bhtd->bhgt", qg, keys) * scale
    logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, values)
    return out.reshape(batch, q_heads, head_dim).to(q.dtype)
