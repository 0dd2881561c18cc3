"""The sparse teacher-forced forward equals the step-by-step sparse decode on the same trajectory."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache

from distill.sparse_forward import SparsePlan, query_page_selection, response_logprobs
from sparrow_sgl.attention import sparse_decode
from sparrow_sgl.config import Schedule

TOL = 1e-5  # float32 on CPU: max |log-prob difference| (measured 4.8e-7; sparse vs dense differ by ~6e-2)
TOL_ENGINE = 1e-5  # vs the embedded engine (own Qwen3 code, float32 CPU): measured 9.5e-7; dense vs engine 8e-2
REFERENCE = "sparrow_test_decode_reference"
_reference_schedule: list[Schedule] = []


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Prefill: dense causal SDPA. Decode (one query): `sparse_decode` over the cached keys laid out in pages."""
    groups = query.shape[1] // key.shape[1]
    if query.shape[2] > 1:
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    schedule = _reference_schedule[-1]
    cfg = dataclasses.replace(schedule.sparsity(), kv_layout="NHD")
    batch, kv_heads, length, dim = key.shape
    n_pages = -(-length // cfg.page_size)
    pad = n_pages * cfg.page_size - length

    def paged(x):  # [B, Hkv, L, D] -> NHD [B * n_pages, page, Hkv, D]
        x = F.pad(x, (0, 0, 0, pad)).transpose(1, 2)
        return x.reshape(batch * n_pages, cfg.page_size, kv_heads, dim)

    # Physical pages in reverse order, so a wrong logical/physical mapping cannot pass by accident.
    order = torch.arange(batch * n_pages).flip(0)
    table = torch.argsort(order).view(batch, n_pages)
    k_cache, v_cache = paged(key)[order], paged(value)[order]
    seq_lens = torch.full((batch,), length)
    out = sparse_decode(query[:, :, 0], k_cache, v_cache, table, seq_lens, schedule.budget_at(length), cfg,
                        layer=module.layer_idx, scale=scaling)
    return out[:, None], None


def reference_decode_logprobs(model, prompt: list[int], response: list[int], schedule: Schedule) -> torch.Tensor:
    """Log-probs of `response` fed token by token through a KV cache, each decode step via `sparse_decode`."""
    AttentionInterface.register(REFERENCE, _reference_attention)
    _reference_schedule.append(schedule)
    previous = model.config._attn_implementation
    model.config._attn_implementation = REFERENCE
    try:
        cache = DynamicCache(config=model.config)
        logits = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
        out = []
        for i, token in enumerate(response):
            out.append(torch.log_softmax(logits.float(), -1)[token])
            if i + 1 < len(response):
                logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]
        return torch.stack(out)
    finally:
        model.config._attn_implementation = previous
        _reference_schedule.pop()



@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Qwen3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _trajectories(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (37, 20)]
    responses = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (60, 75)]
    return prompts, responses


@pytest.mark.parametrize("scorer", ["centroid", "centroid-bf16", "quest"])
def test_sparse_forward_matches_step_by_step_sparse_decode(model, scorer):
    schedule = Schedule(budgets=[None, 48, 64], bin_tokens=32, scorer=scorer)  # dense, then 3 and 4 pages
    prompts, responses = _trajectories(model.config.vocab_size)
    with torch.no_grad():
        sparse, mask, _ = response_logprobs(model, prompts, responses, schedule)
        dense, _, _ = response_logprobs(model, prompts, responses, None)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            ref = reference_decode_logprobs(model, p, r, schedule)
            assert mask[b].sum() == len(r)
            torch.testing.assert_close(sparse[b, : len(r)], ref, atol=TOL, rtol=0)
    # The selection must actually bite: sparse and dense log-probs differ once the budget is below the KV length.
    assert (sparse - dense).abs().max() > 1e-3


def test_dense_schedule_equals_plain_forward(model):
    prompts, responses = _trajectories(model.config.vocab_size, seed=1)
    big = Schedule.fixed(4096)  # budget above every KV length: selection keeps every page
    with torch.no_grad():
        dense, mask, _ = response_logprobs(model, prompts, responses, None)
        sparse, _, _ = response_logprobs(model, prompts, responses, big, backend="sdpa")
    torch.testing.assert_close(sparse[mask], dense[mask], atol=1e-5, rtol=0)


def test_first_response_token_comes_from_dense_prefill(model):
    prompts, responses = _trajectories(model.config.vocab_size, seed=2)
    with torch.no_grad():
        dense, _, _ = response_logprobs(model, prompts, responses, None)
        sparse, _, _ = response_logprobs(model, prompts, responses, Schedule.fixed(48))
    torch.testing.assert_close(sparse[:, 0], dense[:, 0], atol=1e-5, rtol=0)


def test_selection_keeps_sink_and_local_pages_within_budget():
    torch.manual_seed(0)
    batch, q_heads, kv_heads, total, dim = 2, 4, 2, 100, 8
    q, k = torch.randn(batch, q_heads, total, dim), torch.randn(batch, kv_heads, total, dim)
    plan = SparsePlan(torch.tensor([10, 30]), Schedule.fixed(64))
    pages = query_page_selection(q, k, plan)
    assert pages.shape == (batch, kv_heads, total, 7)
    for b, t in [(0, 10), (0, 99), (1, 50)]:
        n = t // 16 + 1
        chosen = pages[b, :, t, :n]
        assert chosen[:, 0].all() and chosen[:, n - 2 :].all()
        assert (chosen.sum(-1) == min(n, 4)).all()
    assert pages[1, :, :30].all()  # prompt queries are dense


def test_sparse_logprobs_are_differentiable(model):
    prompts, responses = _trajectories(model.config.vocab_size, seed=3)
    logprobs, mask, _ = response_logprobs(model, prompts, responses, Schedule.fixed(48))
    logprobs[mask].sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="prompt"):
        SparsePlan(torch.tensor([0]), Schedule.fixed(64))
    with pytest.raises(ValueError, match="backend"):
        SparsePlan(torch.tensor([3]), Schedule.fixed(64), backend="triton")


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine

    return Engine(EngineConfig(model=str(tiny_model_dir), num_kv_pages=256, scorer="quest"))  # serves quest too


def test_sparse_forward_matches_engine_generate_logprobs(model, engine):
    from sparrow_sgl.engine import SamplingParams

    schedule = Schedule(budgets=[None, 48, 64], bin_tokens=32)
    prompts, _ = _trajectories(model.config.vocab_size, seed=4)
    params = SamplingParams(temperature=0.8, max_new_tokens=70, n=2, seed=0, ignore_eos=True)
    rollouts = engine.generate(prompts, params, schedule, progress=False)
    with torch.no_grad():
        ours, mask, _ = response_logprobs(
            model, [r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts], schedule, temperature=0.8
        )
    engine_logprobs = torch.zeros_like(ours)
    for b, r in enumerate(rollouts):
        engine_logprobs[b, : len(r.logprobs)] = torch.tensor(r.logprobs)
    torch.testing.assert_close(ours[mask], engine_logprobs[mask], atol=TOL_ENGINE, rtol=0)


def test_sparse_forward_matches_engine_score(model, engine):
    schedule = Schedule(budgets=[None, 48, 64], bin_tokens=32, scorer="quest")
    prompts, responses = _trajectories(model.config.vocab_size, seed=5)
    scores = engine.score(prompts, responses, sparse=schedule)
    with torch.no_grad():
        ours, _, _ = response_logprobs(model, prompts, responses, schedule)
    for b, s in enumerate(scores):
        torch.testing.assert_close(ours[b, : len(s.logprobs)], s.logprobs, atol=TOL_ENGINE, rtol=0)
