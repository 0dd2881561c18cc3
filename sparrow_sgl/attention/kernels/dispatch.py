"""Pick the decode implementation for CUDA tensors: Triton > FlashInfer > the torch reference.

`SPARROW_ATTN_BACKEND=flashinfer|triton|torch` forces a choice (an unusable forced backend raises). Triton serves any
layout and dtype with a power-of-two head_dim; FlashInfer serves dense decode in either layout and sparse decode on
contiguous HND caches in fp16/bf16, and is the default only where Triton cannot serve: on an H200 the Triton decode
read the KV at ~0.96 of the bytes floor where FlashInfer's read the same KV at ~0.6 (issue 19; on an H100 it was
within a few percent, bench/results/NOTES.md), and it needs no per-call host planning. Page selection runs in
Triton whenever Triton is importable.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from sparrow_sgl.attention.attend import attend_pages
from sparrow_sgl.attention.pages import PageSummaries
from sparrow_sgl.attention.select import Selection, budget_pages_tensor, select_pages
from sparrow_sgl.config import SparsityConfig

BACKENDS = ("flashinfer", "triton", "torch")
ENV_VAR = "SPARROW_ATTN_BACKEND"


@functools.cache
def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _flashinfer_ok(q: torch.Tensor, k_cache: torch.Tensor, cfg: SparsityConfig, sparse: bool) -> bool:
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype:
        return False
    if q.shape[-1] not in (64, 128, 256):
        return False
    return not sparse or (cfg.kv_layout == "HND" and k_cache.is_contiguous())


def pick_backend(q: torch.Tensor, k_cache: torch.Tensor, cfg: SparsityConfig, sparse: bool) -> str:
    """The attention backend for this call."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={forced!r}: choose one of {BACKENDS}")
    if not q.is_cuda or forced == "torch":
        return "torch"
    fi_ok = installed("flashinfer") and _flashinfer_ok(q, k_cache, cfg, sparse)
    tr_ok = installed("triton") and (q.shape[-1] & (q.shape[-1] - 1)) == 0 and q.shape[-1] >= 16
    if forced == "flashinfer" and not fi_ok:
        raise ValueError(f"{ENV_VAR}=flashinfer cannot serve this call (needs flashinfer, fp16/bf16, HND if sparse)")
    if forced == "triton" and not tr_ok:
        raise ValueError(f"{ENV_VAR}=triton cannot serve this call (needs triton and a power-of-two head_dim)")
    if forced:
        return forced
    return "triton" if tr_ok else "flashinfer" if fi_ok else "torch"


def gpu_select_pages(q, summaries, block_table, seq_lens, budget, cfg) -> Selection:
    """Triton selection when available, else the torch reference."""
    if installed("triton"):
        from sparrow_sgl.attention.kernels.triton_select import triton_select_pages

        return triton_select_pages(q, summaries, block_table, seq_lens, budget, cfg)
    return select_pages(q, summaries, block_table, seq_lens, budget, cfg)


def sparse_decode_cuda(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    budget,
    cfg: SparsityConfig,
    *,
    summaries: PageSummaries | None,
    scale: float | None,
    return_selection: bool,
    backend: str,
):
    """`sparse_decode` on CUDA tensors (dense layers already mapped to budget=None by the caller)."""
    seq_lens = seq_lens.to(block_table.device)
    n_pages = (seq_lens.long() + cfg.page_size - 1) // cfg.page_size
    limit = budget_pages_tensor(budget, n_pages, cfg.page_size)
    dense = budget is None or bool((limit >= n_pages).all())
    if not dense and bool((limit < 1).any()):
        raise ValueError(f"every sparse budget must cover at least one page ({cfg.page_size} tokens)")
    if dense:
        selection = select_pages(q, None, block_table, seq_lens, None, cfg)
    else:
        if summaries is None:
            summaries = PageSummaries.from_cache(k_cache, block_table, seq_lens, cfg)
        selection = gpu_select_pages(q, summaries, block_table, seq_lens, budget, cfg)
    out = _attend(q, k_cache, v_cache, block_table, seq_lens, selection, cfg, scale, dense, backend)
    return (out, selection) if return_selection else out


def _attend(q, k_cache, v_cache, block_table, seq_lens, selection, cfg, scale, dense, backend):
    if backend == "flashinfer":
        from sparrow_sgl.attention.kernels import flashinfer_decode as fi

        if dense:
            return fi.flashinfer_attend_dense(q, k_cache, v_cache, block_table, seq_lens, cfg.kv_layout,
                                              cfg.page_size, scale)
        return fi.flashinfer_attend_selection(q, k_cache, v_cache, block_table, seq_lens, selection,
                                              cfg.page_size, scale)
    if backend == "triton":
        from sparrow_sgl.attention.kernels.triton_decode import triton_attend_pages

        counts = selection.valid.sum(-1).to(torch.int32)
        pages = selection.pages.to(torch.int32)
        return triton_attend_pages(q.to(k_cache.dtype), k_cache, v_cache, block_table, seq_lens, pages, counts, cfg,
                                   scale).to(q.dtype)
    return attend_pages(q, k_cache, v_cache, block_table, seq_lens, selection, cfg, scale)


def describe() -> dict:
    """Which backends this process could use (for benchmark records)."""
    return {name: installed(name) for name in ("flashinfer", "triton")} | {"cuda": torch.cuda.is_available()}


__all__ = ["BACKENDS", "describe", "gpu_select_pages", "pick_backend", "sparse_decode_cuda"]
