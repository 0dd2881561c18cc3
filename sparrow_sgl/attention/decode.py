"""Block-sparse decode attention: one query token per request attends to its selected KV pages.

This is the PyTorch reference used on CPU and by tests; on CUDA the kernels in `attention/kernels` implement the
same contract and `sparse_decode` dispatches to them when they are importable.
"""

from __future__ import annotations

import torch

from sparrow_sgl.attention.attend import attend_pages
from sparrow_sgl.attention.pages import PageSummaries, to_hnd
from sparrow_sgl.attention.select import Selection, select_pages
from sparrow_sgl.config import SparsityConfig


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    budget: int | None | list | torch.Tensor,
    cfg: SparsityConfig,
    *,
    layer: int | None = None,
    summaries: PageSummaries | None = None,
    scale: float | None = None,
    return_selection: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Selection]:
    """Decode attention over the pages selected for each (request, KV head).

    q: [batch, q_heads, head_dim]; k_cache/v_cache: paged caches in `cfg.kv_layout`; block_table: [batch, max_pages]
    physical page ids (entries past a request's pages are ignored); seq_lens: [batch] tokens in the cache, the
    current token included; budget: tokens per (request, KV head) — an int, a per-request list/tensor, or None
    (dense). Layers in `cfg.dense_layers` attend densely. Summaries are computed from the cache when not given.
    Returns [batch, q_heads, head_dim] in q's dtype (and the `Selection` if asked).
    """
    _check_shapes(q, k_cache, v_cache, block_table, seq_lens, cfg)
    if cfg.is_dense_layer(layer):
        budget = None
    if q.is_cuda:  # kernels (FlashInfer / Triton) when importable; the torch code below stays the reference
        from sparrow_sgl.attention.kernels import dispatch

        backend = dispatch.pick_backend(q, k_cache, cfg, sparse=budget is not None)
        if backend != "torch":
            return dispatch.sparse_decode_cuda(
                q, k_cache, v_cache, block_table, seq_lens, budget, cfg,
                summaries=summaries, scale=scale, return_selection=return_selection, backend=backend,
            )
    if budget is not None and summaries is None:
        summaries = PageSummaries.from_cache(k_cache, block_table, seq_lens, cfg)
    selection = select_pages(q, summaries if budget is not None else None, block_table, seq_lens, budget, cfg)
    out = attend_pages(q, k_cache, v_cache, block_table, seq_lens, selection, cfg, scale)
    return (out, selection) if return_selection else out


def _check_shapes(q, k_cache, v_cache, block_table, seq_lens, cfg: SparsityConfig) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    k_hnd = to_hnd(k_cache, cfg)
    if k_hnd.shape[-1] != q.shape[-1]:
        raise ValueError(f"head_dim of q ({q.shape[-1]}) and cache ({k_hnd.shape[-1]}) differ")
    if q.shape[1] % k_hnd.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k_hnd.shape[1]})")
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError(
            f"block_table must be [batch, max_pages] and seq_lens [batch] for batch {q.shape[0]}, got "
            f"{tuple(block_table.shape)} and {tuple(seq_lens.shape)}"
        )
    if bool((seq_lens < 1).any()):
        raise ValueError("every sequence must hold at least one token (the current one)")
