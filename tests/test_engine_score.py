"""Scoring: teacher-forced log-probs, dense and with the exact page selection of the sparse decode."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import hf_model, make_engine, random_prompts

from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.engine import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


@pytest.mark.parametrize("scorer", ["centroid", "centroid-bf16", "quest"])
def test_score_reproduces_sparse_rollout_logprobs(tiny_model_dir, scorer):
    engine = make_engine(tiny_model_dir, scorer=scorer)
    prompts = random_prompts([30, 52, 9], seed=11)
    params = SamplingParams(temperature=0.8, max_new_tokens=80, n=2, seed=3, ignore_eos=True)
    rollouts = engine.generate(prompts, params, schedule="fixed:16", progress=False)
    for r in rollouts:  # selection really drops pages: 16 of up to 131 tokens are attended
        assert r.meta["kv_tokens_mean"] <= 16 < len(r.prompt_ids) + len(r.token_ids)
    scores = engine.score(
        [r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts], sparse="fixed:16", temperature=0.8
    )
    dense = engine.score([r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts], temperature=0.8)
    gap = 0.0
    for r, s, d in zip(rollouts, scores, dense):
        torch.testing.assert_close(s.logprobs, torch.tensor(r.logprobs), atol=1e-5, rtol=0)
        assert s.logprobs[0].item() == pytest.approx(
            d.logprobs[0].item(), abs=1e-5
        )  # the first token comes from the dense prefill
        gap = max(gap, (s.logprobs - d.logprobs).abs().max().item())
    assert gap > 1e-3  # and the sparse selection does change later distributions


def test_binned_schedule_budget_follows_length(engine):
    """budget_at(total KV length): 16 tokens below 64, then 32."""
    schedule = Schedule(budgets=[16, 32], bin_tokens=64, page_size=4, name="binned")
    prompts = random_prompts([20], seed=12)
    params = SamplingParams(temperature=1.0, max_new_tokens=100, seed=1, ignore_eos=True)
    (r,) = engine.generate(prompts, params, schedule=schedule, progress=False)
    assert 16 < r.meta["kv_tokens_mean"] < 32
    (s,) = engine.score(prompts, [r.token_ids], sparse=schedule)
    torch.testing.assert_close(s.logprobs, torch.tensor(r.logprobs), atol=1e-5, rtol=0)


def test_dense_score_matches_transformers(engine, tiny_model_dir):
    hf = hf_model(tiny_model_dir)
    prompts, responses = random_prompts([7, 30], seed=13), random_prompts([25, 1], seed=14)
    scores = engine.score(prompts, responses, topk=5, return_full=True, temperature=0.7)
    for prompt, response, s in zip(prompts, responses, scores):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
        ref = (logits / 0.7).log_softmax(-1)
        torch.testing.assert_close(s.full_logprobs, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s.logprobs, ref.gather(-1, torch.tensor(response)[:, None])[:, 0], atol=1e-4, rtol=0)
        vals, ids = s.full_logprobs.topk(5, dim=-1)
        assert torch.equal(s.topk_ids, ids) and torch.equal(s.topk_logprobs, vals)
        assert s.logprobs.shape == (len(response),) and s.logprobs.dtype == torch.float32


def test_score_edge_cases(engine):
    prompts = random_prompts([5, 6], seed=15)
    for sparse in (None, "fixed:16"):
        empty, one = engine.score(prompts, [[], [7]], sparse=sparse, topk=3)
        assert empty.logprobs.shape == (0,) and empty.topk_ids.shape == (0, 3)
        assert one.logprobs.shape == (1,) and one.topk_ids.shape == (1, 3)
    with pytest.raises(ConfigError, match="2 prompts but 1 responses"):
        engine.score(prompts, [[1]])
    with pytest.raises(ConfigError, match="temperature"):
        engine.score(prompts, [[1], [2]], temperature=0)
    assert engine.pool_usage()["used_pages"] == 0


def test_score_in_a_small_pool(tiny_model_dir, engine):
    small = make_engine(tiny_model_dir, num_kv_pages=20, max_prefill_tokens=32)
    prompts, responses = random_prompts([20, 30, 25, 10], seed=16), random_prompts([40, 30, 20, 50], seed=17)
    for sparse in (None, "fixed:16"):
        got = small.score(prompts, responses, sparse=sparse)
        ref = engine.score(prompts, responses, sparse=sparse)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g.logprobs, r.logprobs, atol=1e-5, rtol=0)
