"""Sleep / wake-up of the embedded engine (OpenRLHF's colocated mode) and the KV pool sized like vLLM's
`gpu_memory_utilization` (a fraction of total GPU memory; computed here from a fake device, no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from sparrow_sgl.config import ConfigError, EngineConfig
from sparrow_sgl.engine import Engine, SamplingParams
from sparrow_sgl.engine.kv_cache import GIB, plan_num_pages, utilization_budget
from sparrow_sgl.openrlhf.embedded_backend import EmbeddedBackend

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 13, 21, 34, 55, 89], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]]


def _greedy(engine: Engine) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(PROMPTS, GREEDY, "fixed:48", progress=False)]


def test_sleep_frees_the_pool_and_wake_up_serves_the_same_greedy_output(tiny_model_dir):
    backend = EmbeddedBackend(str(tiny_model_dir), seed=0, max_model_len=256)
    engine = backend.engine
    before, pool_bytes, pages = _greedy(engine), engine.kv_cache.nbytes, engine.kv_cache.num_pages
    assert pool_bytes > 0
    backend.release_memory(["weights", "kv_cache"])
    assert engine.kv_released and engine.kv_cache.nbytes == 0
    assert all(a.k_cache.numel() == 0 and a.v_cache.numel() == 0 and a.summaries is None
               for a in engine.model.attention_layers)  # no layer keeps the old storage alive
    with pytest.raises(RuntimeError, match="KV cache is released"):
        engine.generate(PROMPTS, GREEDY, "dense", progress=False)
    canary = backend.canary(6)  # the post-sync canary still runs (a scratch pool), and the pool sleeps again
    assert len(canary.token_ids) == 6 and engine.kv_released
    backend.resume_memory(["weights"])  # OpenRLHF wakes the weights alone for the sync: the pool stays free
    assert engine.kv_released
    backend.resume_memory(["kv_cache"])
    assert engine.kv_cache.num_pages == pages and engine.kv_cache.nbytes == pool_bytes
    assert _greedy(engine) == before
    awake = backend.canary(6)
    assert awake.token_ids == canary.token_ids and max(abs(a - b) for a, b in zip(awake.logprobs,
                                                                                canary.logprobs)) < 1e-5


def test_sleep_refuses_running_requests_and_unknown_tags(tiny_model_dir):
    backend = EmbeddedBackend(str(tiny_model_dir), seed=0, max_model_len=256)
    engine = backend.engine
    with pytest.raises(ConfigError, match="tags must be among"):
        backend.release_memory(["kv"])
    engine.block_manager.allocate_group(20, 1, 40)  # a request holding pages
    with pytest.raises(RuntimeError, match="requests hold"):
        engine.release_kv_cache()
    assert not engine.kv_released


def test_kv_pool_follows_gpu_memory_utilization(monkeypatch, tiny_model_dir):
    total, weights, page_bytes = 80 * GIB, 3 * GIB, 2 * 1024**2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, total))  # others use the rest
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: weights)
    cfg = EngineConfig(model=str(tiny_model_dir), device="cuda", gpu_memory_utilization=0.5)
    assert plan_num_pages(cfg, page_bytes) == int((0.5 * total - weights) // page_bytes)  # total, not free memory
    cfg = EngineConfig(model=str(tiny_model_dir), device="cuda", gpu_memory_utilization=0.03)
    with pytest.raises(ConfigError, match="raise --vllm.gpu_memory_utilization"):
        plan_num_pages(cfg, page_bytes)
    assert utilization_budget(total, weights, 0.9) == 0.9 * total - weights
    with pytest.raises(ConfigError, match="gpu_memory_utilization must lie in"):
        EngineConfig(model=str(tiny_model_dir), gpu_memory_utilization=1.5)
    backend = EmbeddedBackend(str(tiny_model_dir), seed=0, max_model_len=64, gpu_memory_utilization=0.4)
    assert backend.engine.config.gpu_memory_utilization == 0.4  # the flag reaches the engine (CPU: unused)


@pytest.mark.gpu
def test_cuda_sleep_returns_the_pool_and_graph_memory(tiny_model_dir):
    engine = Engine(EngineConfig(model=str(tiny_model_dir), device="cuda", max_model_len=256, kv_gb=0.25))
    before = _greedy(engine)  # captures the decode CUDA graphs on the pool
    captured, seconds = engine.runner.graph_captures()
    assert captured >= 1 and seconds > 0
    held, pool = torch.cuda.memory_allocated(), engine.kv_cache.nbytes
    engine.release_kv_cache()
    assert pool > 0.2 * GIB and held - torch.cuda.memory_allocated() >= pool
    assert engine.runner._gpu is None  # the decoder and its CUDA graphs (and their pool) are dropped
    assert engine.runner.graph_captures() == (captured, seconds)  # the count outlives the dropped decoder
    engine.resume_kv_cache()
    assert _greedy(engine) == before  # graphs re-captured on the new pool's addresses
    assert engine.runner.graph_captures()[0] == 2 * captured
