"""The SGLang backend's graph decode state (`sglang/graph_state.py`) without SGLang: its Triton selection + decode
(the engine's scoring launch, all KV heads per program by default) against its own torch reference path, on CUDA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sparrow_sgl.attention import PageSummaries
from sparrow_sgl.config import Schedule, SparsityConfig
from sparrow_sgl.sglang.graph_state import GraphDecodeState

PAGE, KV_HEADS, Q_HEADS, DIM = 16, 8, 16, 128


@pytest.mark.gpu
@pytest.mark.parametrize("all_heads", ["1", "0"])
def test_triton_graph_decode_equals_the_reference(monkeypatch, all_heads):
    monkeypatch.setenv("SPARROW_SCORE_HEADS", all_heads)
    gen = torch.Generator().manual_seed(3)
    lengths, max_context, dev = [300, 17, 512, 129], 512, "cuda"
    pages = torch.randperm(len(lengths) * max_context // PAGE, generator=gen) + 1  # page 0: padding rows
    req_to_token = torch.zeros(len(lengths), max_context, dtype=torch.int32)
    for slot in range(len(lengths)):
        row_pages = pages[slot * max_context // PAGE : (slot + 1) * max_context // PAGE]
        req_to_token[slot] = (row_pages[:, None] * PAGE + torch.arange(PAGE)).flatten().int()
    num_pages = int(pages.max()) + 1
    k_cache, v_cache = (torch.randn(num_pages, PAGE, KV_HEADS, DIM, generator=gen).to(dev) for _ in range(2))
    summaries = PageSummaries.allocate(num_pages, KV_HEADS, DIM, device=dev)
    for slot, n in enumerate(lengths):
        loc = req_to_token[slot, :n].long().to(dev)
        summaries.append(loc // PAGE, loc % PAGE, k_cache.view(-1, KV_HEADS, DIM)[loc])
    cfg, schedule = SparsityConfig(page_size=PAGE), Schedule.fixed(64, page_size=PAGE)
    state = GraphDecodeState(req_to_token.to(dev), cfg, schedule, max_bs=4, kv_heads=KV_HEADS, num_sparse_layers=1)
    state.bind([schedule] * len(lengths), list(range(len(lengths))), [True] * len(lengths))
    state.prepare(SimpleNamespace(batch_size=len(lengths), req_pool_indices=torch.arange(len(lengths), device=dev),
                                  seq_lens=torch.tensor(lengths, device=dev)))
    q = torch.randn(len(lengths), Q_HEADS, DIM, generator=gen).to(dev)
    got = state.attend(q, k_cache, v_cache, summaries, DIM**-0.5, triton=True)
    want = state.attend(q, k_cache, v_cache, summaries, DIM**-0.5, triton=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
