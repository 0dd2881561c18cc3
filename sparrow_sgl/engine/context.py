"""Per-step attention metadata, set once by the model runner and read by every attention layer (nano-vllm style)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparrow_sgl.config import SparsityConfig


@dataclass
class Context:
    is_prefill: bool = False
    sparsity: SparsityConfig | None = None
    # where each new token's K/V goes: physical page and offset inside it, [num_new_tokens]
    slot_pages: torch.Tensor | None = None
    slot_offsets: torch.Tensor | None = None
    # [batch, max_pages] physical page ids (padded with 0) and [batch] KV length including the new tokens
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    # prefill only: number of new tokens of each sequence (python ints; prefill is never graph-captured)
    query_lens: list[int] = field(default_factory=list)
    prefill_kv_lens: list[int] = field(default_factory=list)
    # decode only: KV budget in tokens per request, -1 = dense
    budgets: torch.Tensor | None = None
    # decode only: attended KV tokens per request, summed over sparse layers (mean over KV heads); filled by layers
    attended_tokens: torch.Tensor | None = None
    # decode on CUDA: the graph-capturable step (engine/cuda_graph.py) that runs each layer's attention
    gpu: object | None = None


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(context: Context) -> None:
    global _CONTEXT
    _CONTEXT = context


def reset_context() -> None:
    set_context(Context())
