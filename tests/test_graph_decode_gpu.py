"""The engine's sync-free GPU decode step (engine/cuda_graph.py): CUDA-graph replay == eager == torch reference.

CPU tests cover the host-side math (padded batches, budget tables that the graph reads as data); `-m gpu` tests
run the engine on CUDA in three modes: graph replay, the same step eagerly, and the torch reference path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from engine_helpers import random_prompts
from triton_helpers import HAS_TRITON, INTERPRET

from sparrow_sgl.config import EngineConfig, Schedule, SparsityConfig
from sparrow_sgl.engine import Engine, SamplingParams
from sparrow_sgl.engine.cuda_graph import (
    GRAPH_BATCHES_ENV,
    MAX_BINS,
    MODE_ENV,
    WIDTH_ENV,
    GraphDecodeRunner,
    budget_table,
    decode_splits,
    host_budget_pages,
    make_gpu_decoder,
    padded_batch,
    step_width,
    table_width,
)
from sparrow_sgl.schedule import load_preset

HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None


# ---------------------------------------------------------------- CPU: host-side math

def test_padded_batches_and_table_widths(monkeypatch):
    assert [padded_batch(n) for n in (1, 2, 3, 5, 16, 17, 200, 300)] == [1, 2, 4, 8, 16, 32, 256, 300]
    monkeypatch.setenv(GRAPH_BATCHES_ENV, "1,2,4,8,16,24:32,40")
    assert [padded_batch(n) for n in (3, 17, 34, 65)] == [4, 24, 40, 65]
    for bad in ("1,2,x", "4,2", "0,1", "2,2"):
        monkeypatch.setenv(GRAPH_BATCHES_ENV, bad)
        with pytest.raises(ValueError, match=GRAPH_BATCHES_ENV):
            padded_batch(3)
    monkeypatch.delenv(GRAPH_BATCHES_ENV)
    assert [table_width(p) for p in (1, 16, 17, 2048, 2049)] == [16, 16, 32, 2048, 4096]


def test_step_width_follows_the_pages_reached_not_the_pages_allocated(monkeypatch):
    tables = [list(range(2048)), list(range(100))]  # a 32K-token response allocated up front, a short one
    assert step_width(tables, [0, 5], 16) == 16
    assert step_width(tables, [2047, 99], 16) == 128  # 128 pages reached
    assert step_width(tables, [2048, 99], 16) == 256  # the 129th page
    assert step_width(tables, [32767, 99], 16) == 2048
    assert step_width([list(range(40))], [1000], 16) == 64  # never wider than the tables
    monkeypatch.setenv(WIDTH_ENV, "allocated")
    assert step_width(tables, [0, 5], 16) == 2048
    monkeypatch.setenv(WIDTH_ENV, "longest")
    with pytest.raises(ValueError, match=WIDTH_ENV):
        step_width(tables, [0, 5], 16)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_a_step_is_keyed_by_the_split_plan_of_its_live_requests(monkeypatch):
    """The decode programs per row come from the live requests (an H200: 132 SMs), not the padded batch, so a batch
    shrinking within its padded size captures another graph when its plan changes; SPARROW_DECODE_WAVES restores
    the earlier rule over the padded rows."""
    monkeypatch.delenv("SPARROW_DECODE_WAVES", raising=False)
    assert decode_splits(34, 8, 2048, 256, 16, 132) == (9, 5)  # 272 live rows of a padded 64
    assert decode_splits(25, 8, 2048, 512, 16, 132) == (5, 5)  # 200 of 256
    assert decode_splits(13, 8, 2048, None, 16, 132) == (5, 0)  # no sparse layers
    assert decode_splits(20, 8, 2048, 512, 16, 132) != decode_splits(25, 8, 2048, 512, 16, 132)  # same padded 32
    runner = SimpleNamespace(dense_backend="triton", sparse_backend="flashinfer", kv_heads=8,
                             device=torch.device("cpu"))
    cfg = SparsityConfig(page_size=16)
    assert GraphDecodeRunner._decode_splits(runner, 25, 2048, 512, cfg) == (5, 0)  # FlashInfer attends sparse layers
    runner.dense_backend = "flashinfer"
    assert GraphDecodeRunner._decode_splits(runner, 25, 2048, 512, cfg) == (0, 0)
    monkeypatch.setenv("SPARROW_DECODE_WAVES", "8")
    assert decode_splits(34, 8, 2048, 256, 16, 132) == (3, 3)


@pytest.mark.parametrize("schedule", [
    load_preset("qwen3-4b-0.86"),
    Schedule(budgets=[None, 64, 128, None, 96], page_size=16, bin_tokens=100),
    Schedule.fixed(1024),
])
def test_device_budget_table_equals_budget_at(schedule):
    width = 256
    table, k_cols = budget_table(schedule, width)
    assert table.shape == (MAX_BINS,) and table.dtype == np.int32
    seq_lens = np.random.default_rng(0).integers(1, 40_000, size=500)
    got = host_budget_pages(table, schedule.bin_tokens, seq_lens)
    for seq, pages in zip(seq_lens, got):
        budget = schedule.budget_at(int(seq))
        assert pages == (width if budget is None else min(budget // 16, width))
    assert k_cols >= table.max() and k_cols <= width and k_cols & (k_cols - 1) == 0


def test_no_gpu_decoder_on_cpu(tiny_model_dir):
    engine = Engine(EngineConfig(model=str(tiny_model_dir), num_kv_pages=64, page_size=4))
    assert make_gpu_decoder(engine.model, engine.device) is None and engine.runner.gpu_decoder() is None


def test_the_removed_bf16_centroid_switch_names_its_replacement(tiny_model_dir, monkeypatch):
    engine = Engine(EngineConfig(model=str(tiny_model_dir), num_kv_pages=64, page_size=4))
    monkeypatch.setenv("SPARROW_BF16_CENTROIDS", "1")
    with pytest.raises(ValueError, match="scorer='centroid-bf16'"):
        make_gpu_decoder(engine.model, engine.device)


# ---------------------------------------------------------------- the fused append kernel (GPU or interpreter)

@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.gpu),
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="set SPARROW_TRITON_INTERPRET=1")),
])
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("centroid_dtype", [torch.float32, torch.bfloat16])
def test_append_kv_decode_matches_torch(device, centroid_dtype):
    from sparrow_sgl.attention import PageSummaries
    from sparrow_sgl.attention.kernels.triton_summaries import append_kv_decode

    pages_n, kv, page, dim = 12, 2, 8, 64
    k_ref, v_ref = torch.randn(2, pages_n, kv, page, dim, device=device)
    k_got, v_got = k_ref.clone(), v_ref.clone()
    ref = PageSummaries.allocate(pages_n, kv, dim, device=device)
    got = PageSummaries.allocate(pages_n, kv, dim, device=device)
    centroid = torch.zeros(pages_n, kv, dim, device=device, dtype=centroid_dtype)
    for step in range(20):
        pages = torch.tensor([step // 8, 5 + step // 8, 11, -1], device=device)  # the last row is padding
        offsets = torch.tensor([step % 8, step % 8, step % 3, step % 8], device=device)
        keys, values = torch.randn(4, kv, dim, device=device), torch.randn(4, kv, dim, device=device)
        live = pages >= 0
        ref.append(pages[live], offsets[live], keys[live])
        k_ref[pages[live], :, offsets[live]] = keys[live]
        v_ref[pages[live], :, offsets[live]] = values[live]
        append_kv_decode(k_got, v_got, got, pages.int(), offsets.int(), keys, values, centroid=centroid)
    assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)
    for name in ("key_sum", "count", "key_min", "key_max"):
        assert torch.allclose(getattr(got, name).float(), getattr(ref, name).float(), atol=1e-5), name
    used = ref.count > 0
    assert torch.equal(centroid[used], got.centroid()[used].to(centroid_dtype))  # the reference's rounding, exactly


# ---------------------------------------------------------------- engine decode on CUDA: graph == eager == reference

def _engine(model_dir, dtype: str, page_size: int) -> Engine:
    return Engine(EngineConfig(model=str(model_dir), device="cuda", dtype=dtype, page_size=page_size,
                               num_kv_pages=400, max_model_len=512))


def _generate(model_dir, monkeypatch, dtype, page_size, schedule, prompts, mode, backend=None, max_new=40):
    """Greedy rollouts with SPARROW_GPU_DECODE=mode ('reference' = the torch path) and an attention backend."""
    monkeypatch.delenv(MODE_ENV, raising=False)
    monkeypatch.delenv("SPARROW_ATTN_BACKEND", raising=False)
    if mode == "reference":
        monkeypatch.setenv("SPARROW_ATTN_BACKEND", "torch")
    else:
        monkeypatch.setenv(MODE_ENV, mode)
        if backend:
            monkeypatch.setenv("SPARROW_ATTN_BACKEND", backend)
    engine = _engine(model_dir, dtype, page_size)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
    rollouts = engine.generate(prompts, params, schedule=schedule, progress=False)
    gpu = engine.runner.gpu_decoder()
    assert (gpu is None) == (mode == "reference")
    if gpu is not None:
        assert all((step.graph is not None) == (mode == "graph") for step in gpu.steps.values())
    return engine, rollouts


def _mixed_schedule(page_size: int) -> Schedule:
    """Dense first bin, then growing budgets (bins of 32 tokens), layer 0 dense."""
    p = page_size
    return Schedule(budgets=[None, 4 * p, 6 * p, 5 * p], page_size=p, bin_tokens=32, dense_layers=[0], name="mixed")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("schedule", ["dense", "fixed:16", "mixed"])
def test_float32_graph_equals_eager_equals_torch_reference(tiny_model_dir, monkeypatch, schedule):
    schedule = _mixed_schedule(4) if schedule == "mixed" else schedule
    prompts = random_prompts([30, 52, 9], seed=4)  # 3 requests: a padded batch of 4
    runs = {mode: _generate(tiny_model_dir, monkeypatch, "float32", 4, schedule, prompts, mode)[1]
            for mode in ("graph", "eager", "reference")}
    for mode in ("eager", "reference"):
        for got, want in zip(runs["graph"], runs[mode]):
            assert got.token_ids == want.token_ids, mode
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)
            assert abs(got.meta["kv_tokens_mean"] - want.meta["kv_tokens_mean"]) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
@pytest.mark.parametrize("schedule", ["dense", "fixed:64"])
def test_bfloat16_graph_equals_eager_and_scores_like_the_reference(tiny_model_factory, monkeypatch, backend,
                                                                   schedule):
    if backend == "flashinfer" and not HAS_FLASHINFER:
        pytest.skip("flashinfer not installed")
    model_dir = tiny_model_factory(head_dim=128)  # FlashInfer serves head_dim 128
    prompts = random_prompts([200, 90, 310], seed=5)
    _, graph = _generate(model_dir, monkeypatch, "bfloat16", 16, schedule, prompts, "graph", backend, max_new=24)
    _, eager = _generate(model_dir, monkeypatch, "bfloat16", 16, schedule, prompts, "eager", backend, max_new=24)
    for got, want in zip(graph, eager):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-6, rtol=0)
    if schedule != "dense":
        assert all(r.meta["kv_tokens_mean"] <= 64 for r in graph)
    reference, _ = _generate(model_dir, monkeypatch, "bfloat16", 16, schedule, prompts[:1], "reference", max_new=1)
    scores = reference.score([r.prompt_ids for r in graph], [r.token_ids for r in graph], sparse=schedule)
    for r, s in zip(graph, scores):
        torch.testing.assert_close(s.logprobs, torch.tensor(r.logprobs), atol=5e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("schedule", ["dense", "fixed:16"])
def test_steps_widen_with_the_pages_reached(tiny_model_dir, monkeypatch, schedule):
    """Responses allocated 300 tokens (76 pages of 4) up front decode at 16, 32, 64 then 128 columns as they grow,
    chained launch to launch within a width, sharing one logits buffer; the tokens are the eager path's (which the
    reference test pins)."""
    prompts = random_prompts([30, 9], seed=12)
    engine, graph = _generate(tiny_model_dir, monkeypatch, "float32", 4, schedule, prompts, "graph", max_new=270)
    steps = engine.runner.gpu_decoder().steps
    assert {key.width for key in steps} == {16, 32, 64, 128}
    assert len({step.logits.data_ptr() for step in steps.values()}) == 1  # one logits buffer per padded batch
    _, eager = _generate(tiny_model_dir, monkeypatch, "float32", 4, schedule, prompts, "eager", max_new=270)
    for got, want in zip(graph, eager):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_one_graph_serves_schedules_with_the_same_page_list_width(tiny_model_dir, monkeypatch):
    prompts = random_prompts([40, 70], seed=6)
    engine, _ = _generate(tiny_model_dir, monkeypatch, "float32", 4, "fixed:16", prompts, "graph", max_new=8)
    gpu = engine.runner.gpu_decoder()
    graphs = sum(step.graph is not None for step in gpu.steps.values())
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    other = Schedule(budgets=[12, 20], page_size=4, bin_tokens=64, name="other")  # <= 16 pages: same width
    engine.generate(prompts, params, schedule=other, progress=False)
    assert sum(step.graph is not None for step in gpu.steps.values()) == graphs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_bf16_centroid_copy_equals_the_rounded_float32_centroids(tiny_model_factory, monkeypatch):
    """The "centroid-bf16" scorer's copy, kept by prefill and the append kernels, is the reference's centroid rounded
    to bf16, bit for bit; a "centroid" schedule keeps no copy."""
    model_dir = tiny_model_factory(head_dim=128)
    engine, _ = _generate(model_dir, monkeypatch, "bfloat16", 16, "fixed:64", random_prompts([150]), "graph", max_new=4)
    assert engine.runner.gpu_decoder().centroids is None
    schedule = Schedule.fixed(64, page_size=16, scorer="centroid-bf16")
    engine, rollouts = _generate(model_dir, monkeypatch, "bfloat16", 16, schedule, random_prompts([150, 260]),
                                 "graph", max_new=20)
    assert all(r.meta["kv_tokens_mean"] <= 64 for r in rollouts)
    gpu = engine.runner.gpu_decoder()
    for attn, centroid in zip(engine.model.attention_layers, gpu.centroids):
        used = attn.summaries.count > 0
        assert torch.equal(centroid[used], attn.summaries.centroid()[used].to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_centroid_scorer_graph_equals_eager_equals_torch_reference(tiny_model_factory, monkeypatch, dtype):
    """The same tokens and attended KV on the graph path (bf16 copy), eager and, in float32, the torch reference
    (rounding the float32 centroids), after a dense schedule ran first on the same engine (its steps are dropped and
    captured again with the copy). bf16 engines differ from the reference in attention arithmetic, not selection."""
    model_dir = tiny_model_factory(head_dim=128)
    schedule = dataclasses.replace(_mixed_schedule(16), scorer="centroid-bf16")
    prompts = random_prompts([120, 52, 300], seed=9)
    runs = {}
    modes = ("graph", "eager", "reference") if dtype == "float32" else ("graph", "eager")
    for mode in modes:
        engine, _ = _generate(model_dir, monkeypatch, dtype, 16, "dense", prompts[:1], mode, max_new=4)
        params = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
        runs[mode] = engine.generate(prompts, params, schedule=schedule, progress=False)
    for mode in modes[1:]:
        for got, want in zip(runs["graph"], runs[mode]):
            assert got.token_ids == want.token_ids, mode
            assert abs(got.meta["kv_tokens_mean"] - want.meta["kv_tokens_mean"]) < 1e-3, mode


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_one_launch_selection_leaves_greedy_decode_unchanged(tiny_model_dir, monkeypatch):
    """The fused score + top-k launch and the two-launch baseline decode the same tokens with the same log-probs."""
    prompts = random_prompts([30, 52, 9, 77], seed=7)
    runs = {}
    for launches in ("1", "2"):
        monkeypatch.setenv("SPARROW_SELECT_LAUNCHES", launches)
        runs[launches] = _generate(tiny_model_dir, monkeypatch, "float32", 4, _mixed_schedule(4), prompts, "graph")[1]
    for got, want in zip(runs["1"], runs["2"]):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-6, rtol=0)


def test_select_launches_env_is_validated(monkeypatch):
    from sparrow_sgl.engine.cuda_graph import select_launches

    monkeypatch.setenv("SPARROW_SELECT_LAUNCHES", "3")
    with pytest.raises(ValueError, match="SPARROW_SELECT_LAUNCHES"):
        select_launches()
    monkeypatch.delenv("SPARROW_SELECT_LAUNCHES")
    assert select_launches() == 2
