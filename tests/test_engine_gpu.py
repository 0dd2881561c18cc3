"""The engine on CUDA in bfloat16 (its default there): runs, stays close to float32, scoring reproduces rollouts."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_engine, random_prompts

from sparrow_sgl.engine import SamplingParams

pytestmark = pytest.mark.gpu


def test_cuda_bfloat16_generate_and_score(tiny_model_dir):
    engine = make_engine(tiny_model_dir, device="cuda", dtype="auto")
    assert engine.dtype == torch.bfloat16 and engine.kv_cache.k.is_cuda
    prompts = random_prompts([30, 52, 9], seed=11)
    params = SamplingParams(temperature=1.0, max_new_tokens=64, n=2, seed=3, ignore_eos=True, logprobs_topk=5)
    rollouts = engine.generate(prompts, params, schedule="fixed:16", progress=False)
    assert [len(r.token_ids) for r in rollouts] == [64] * 6
    assert all(r.meta["kv_tokens_mean"] <= 16 for r in rollouts)
    scores = engine.score([r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts], sparse="fixed:16")
    for r, s in zip(rollouts, scores):
        torch.testing.assert_close(s.logprobs, torch.tensor(r.logprobs), atol=5e-2, rtol=0)
    assert engine.pool_usage()["used_pages"] == 0


def test_cuda_bfloat16_close_to_float32(tiny_model_dir):
    prompts, responses = random_prompts([40], seed=1), random_prompts([30], seed=2)
    bf16 = make_engine(tiny_model_dir, device="cuda", dtype="bfloat16")
    fp32 = make_engine(tiny_model_dir, device="cuda", dtype="float32")
    (a,) = bf16.score(prompts, responses, sparse="dense", return_full=True)
    (b,) = fp32.score(prompts, responses, sparse="dense", return_full=True)
    assert (a.full_logprobs.exp() - b.full_logprobs.exp()).abs().sum(-1).max() < 0.05  # total variation x 2
