"""Teacher-forced sparse attention: every position attends as the sparse decode would have at that position.

Each query position t is treated as one decode "request" of length t + 1 that shares the sequence's pages, so the
selection rules are exactly those of `sparse_decode` (same summaries, scorer, sink/local pages, dense layers).
"""

from __future__ import annotations

import torch

from sparrow_sgl.attention.decode import sparse_decode
from sparrow_sgl.attention.pages import PageSummaries
from sparrow_sgl.config import SparsityConfig


def sparse_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budgets: torch.Tensor,
    cfg: SparsityConfig,
    *,
    layer: int | None = None,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Causal attention of one sequence where position t reads at most budgets[t] KV tokens (negative = dense).

    q: [T, q_heads, head_dim]; k, v: [T, kv_heads, head_dim]; budgets: [T] int tokens. Returns [T, q_heads, head_dim].
    """
    seq_len, kv_heads, head_dim = k.shape
    if q.shape[0] != seq_len or v.shape != k.shape or budgets.shape != (seq_len,):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and budgets {tuple(budgets.shape)} disagree"
        )
    page_size = cfg.page_size
    n_pages = -(-seq_len // page_size)
    pad = n_pages * page_size - seq_len
    nhd = SparsityConfig(
        page_size=page_size,
        sink_pages=cfg.sink_pages,
        local_pages=cfg.local_pages,
        scorer=cfg.scorer,
        dense_layers=cfg.dense_layers,
        kv_layout="NHD",
    )
    k_cache = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(n_pages, page_size, kv_heads, head_dim)
    v_cache = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(n_pages, page_size, kv_heads, head_dim)
    table = torch.arange(n_pages, device=k.device)[None, :]
    summaries = PageSummaries.from_cache(k_cache, table, torch.tensor([seq_len], device=k.device), nhd)
    out = torch.empty_like(q)
    for start in range(0, seq_len, chunk):
        end = min(start + chunk, seq_len)
        seq_lens = torch.arange(start + 1, end + 1, device=k.device)
        out[start:end] = sparse_decode(
            q[start:end],
            k_cache,
            v_cache,
            table.expand(end - start, -1),
            seq_lens,
            budgets[start:end],
            nhd,
            layer=layer,
            summaries=summaries,
            scale=scale,
        )
    return out
