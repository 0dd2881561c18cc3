"""Generation: greedy == transformers, batching invariance, seeded sampling, top-k log-probs, KV pool limits."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import hf_model, make_engine, random_prompts

from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.engine import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)



@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir)


@pytest.mark.parametrize("schedule", ["dense", "fixed:64"])
def test_greedy_matches_transformers_generate(engine, tiny_model_dir, schedule):
    """Dense, or a budget (64 tokens) >= every sequence's length (<= 24 + 24)."""
    hf = hf_model(tiny_model_dir)
    prompts = random_prompts([5, 24, 11])
    rollouts = engine.generate(prompts, GREEDY, schedule=schedule, progress=False)
    for prompt, rollout in zip(prompts, rollouts):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert rollout.token_ids == ref[0, len(prompt) :].tolist()
        assert rollout.finish_reason == "length" and rollout.prompt_ids == prompt
        assert rollout.meta["schedule"] == schedule


def test_eos_stops_like_transformers(engine, tiny_model_dir):
    hf = hf_model(tiny_model_dir)
    prompts = random_prompts([6, 9], seed=3)
    eos = engine.eos_token_ids
    params = SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=(17, 40, 99))
    for prompt, rollout in zip(prompts, engine.generate(prompts, params, progress=False)):
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=[*eos, 17, 40, 99], pad_token_id=0
        )[0, len(prompt) :].tolist()
        stops = [i for i, t in enumerate(ref) if t in {*eos, 17, 40, 99}]
        ref = ref[: stops[0] + 1] if stops else ref
        assert rollout.token_ids == ref
        assert rollout.finish_reason == ("stop" if stops else "length")


@pytest.mark.parametrize("schedule", ["dense", "fixed:16"])
def test_batched_mixed_lengths_equal_one_at_a_time(engine, schedule):
    prompts = random_prompts([3, 40, 17, 8], seed=1)
    batched = engine.generate(prompts, GREEDY, schedule=schedule, progress=False)
    for prompt, rollout in zip(prompts, batched):
        (single,) = engine.generate([prompt], GREEDY, schedule=schedule, progress=False)
        assert single.token_ids == rollout.token_ids
        assert single.logprobs == pytest.approx(rollout.logprobs, abs=1e-5)


def test_text_prompts_and_prompt_major_order(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=5, n=3, seed=1)
    rollouts = engine.generate(["a = 3 ;", "def add(a, b):"], params, progress=False)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(p, s) for p in range(2) for s in range(3)]
    assert rollouts[0].prompt_ids == engine.tokenizer.encode("a = 3 ;")
    assert all(isinstance(r.text, str) for r in rollouts)


def test_last_run_splits_wall_time_into_prefill_and_decode(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=1, ignore_eos=True)
    engine.generate(random_prompts([9, 5], seed=4), params, progress=False)
    times = engine.last_run
    assert times.prefill_steps >= 1 and times.decode_steps == 5  # the first token comes from the prefill
    assert times.prefill_s > 0 and times.decode_s > 0


def test_seeded_sampling_is_reproducible(engine):
    prompts = random_prompts([7, 12], seed=2)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=16, n=3, seed=123)
    a = engine.generate(prompts, params, progress=False)
    b = engine.generate(prompts, params, progress=False)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert len({tuple(r.token_ids) for r in a}) > 1  # the samples of a prompt differ
    c = engine.generate(prompts, SamplingParams(temperature=0.9, max_new_tokens=16, n=3, seed=124), progress=False)
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=16)
    assert engine.generate(prompts, unseeded, progress=False) != engine.generate(prompts, unseeded, progress=False)


def test_topk_logprobs_sorted_and_consistent(engine):
    prompts = random_prompts([10, 4], seed=4)
    params = SamplingParams(temperature=1.0, max_new_tokens=20, n=2, seed=5, logprobs_topk=20)
    hits = 0
    for rollout in engine.generate(prompts, params, progress=False):
        assert len(rollout.topk_ids) == len(rollout.token_ids) == len(rollout.logprobs)
        for token, logprob, ids, lps in zip(
            rollout.token_ids, rollout.logprobs, rollout.topk_ids, rollout.topk_logprobs
        ):
            assert len(ids) == 20 and lps == sorted(lps, reverse=True)
            assert logprob <= 0
            if token in ids:
                hits += 1
                assert lps[ids.index(token)] == pytest.approx(logprob, abs=1e-6)
            else:
                assert logprob <= lps[-1] + 1e-6
    assert hits > 0


def test_top_k_and_top_p_restrict_the_draw(engine):
    prompts = random_prompts([6], seed=6)
    params = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=20, n=4, seed=0, logprobs_topk=5)
    for rollout in engine.generate(prompts, params, progress=False):
        for token, ids, lps in zip(rollout.token_ids, rollout.topk_ids, rollout.topk_logprobs):
            assert token in ids[:3]
            assert lps[3] == float("-inf")  # filtered out of the sampled distribution
            assert sum(torch.tensor(lps[:3]).exp().tolist()) == pytest.approx(1.0, abs=1e-5)
    params = SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10, seed=0)
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    nucleus = engine.generate(prompts, params, progress=False)[0]
    assert nucleus.token_ids == engine.generate(prompts, greedy, progress=False)[0].token_ids
    assert nucleus.logprobs == [0.0] * 10  # a one-token nucleus holds all the mass


def test_greedy_logprobs_are_the_model_distribution(engine):
    """Greedy (temperature 0) reports log-probs of the plain softmax, the same as a teacher-forced dense score."""
    prompts = random_prompts([8], seed=7)
    (rollout,) = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12), progress=False)
    (score,) = engine.score(prompts, [rollout.token_ids])
    assert rollout.logprobs == pytest.approx(score.logprobs.tolist(), abs=1e-5)


def test_small_pool_finishes_every_request(tiny_model_dir, engine):
    # each sample needs ceil((12 + 40 - 1) / 4) = 13 pages, a group of 2 needs 3 + 2 * 10 = 23; the pool has 30
    small = make_engine(tiny_model_dir, num_kv_pages=30)
    prompts = random_prompts([12, 12, 12, 12, 12], seed=8)
    params = SamplingParams(temperature=0, max_new_tokens=40, n=2, ignore_eos=True)
    got = small.generate(prompts, params, schedule="fixed:16", progress=False)
    ref = engine.generate(prompts, params, schedule="fixed:16", progress=False)
    assert [len(r.token_ids) for r in got] == [40] * 10
    assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    assert small.pool_usage()["used_pages"] == 0 and small.pool_usage()["peak_used_pages"] <= 30
    # a group of 3 samples does not fit at all: it is split into smaller groups instead of failing
    params3 = SamplingParams(temperature=0, max_new_tokens=40, n=3, ignore_eos=True)
    assert [len(r.token_ids) for r in small.generate(prompts[:1], params3, progress=False)] == [40] * 3
    with pytest.raises(ConfigError, match="needs .* KV pages but the whole pool has 30"):
        small.generate(random_prompts([100]), SamplingParams(max_new_tokens=40), progress=False)


def test_max_num_seqs_limits_the_batch(tiny_model_dir, engine):
    limited = make_engine(tiny_model_dir, max_num_seqs=2)
    prompts = random_prompts([5, 9, 13], seed=9)
    params = SamplingParams(temperature=0, max_new_tokens=10, n=2, ignore_eos=True)
    got = limited.generate(prompts, params, progress=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in engine.generate(prompts, params, progress=False)]


@pytest.mark.parametrize("prompt_len", [40, 42])
def test_samples_share_prompt_pages(engine, prompt_len):
    """n samples hold the full prompt pages once; the partial last page is copied, so greedy samples agree."""
    prompts = random_prompts([prompt_len], seed=10)
    params = SamplingParams(temperature=0, max_new_tokens=4, n=4, ignore_eos=True)
    rollouts = engine.generate(prompts, params, progress=False)
    shared, per_sample = prompt_len // 4, -(-(prompt_len + 3) // 4)
    usage = engine.pool_usage()
    assert usage["peak_used_pages"] == shared + 4 * (per_sample - shared) < 4 * per_sample
    assert usage["used_pages"] == 0
    (single,) = engine.generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True), progress=False
    )
    assert all(r.token_ids == single.token_ids for r in rollouts)
    assert all(r.logprobs == pytest.approx(single.logprobs, abs=1e-6) for r in rollouts)


def test_max_model_len_caps_the_answer(tiny_model_dir):
    capped = make_engine(tiny_model_dir, max_model_len=20)
    (rollout,) = capped.generate(
        random_prompts([15]), SamplingParams(max_new_tokens=50, ignore_eos=True), progress=False
    )
    assert len(rollout.token_ids) == 5 and rollout.finish_reason == "length"
    with pytest.raises(ConfigError, match="max_model_len"):
        capped.generate(random_prompts([20]), SamplingParams(max_new_tokens=1), progress=False)


def test_bad_schedule_and_requests_error_clearly(engine):
    prompts = random_prompts([5])
    with pytest.raises(ConfigError, match="unknown schedule"):
        engine.generate(prompts, GREEDY, schedule="nonsense", progress=False)
    with pytest.raises(ConfigError, match="not a multiple of the page size"):
        engine.generate(prompts, GREEDY, schedule="fixed:10", progress=False)
    with pytest.raises(ConfigError, match="page_size 16"):
        engine.generate(prompts, GREEDY, schedule=Schedule.fixed(64), progress=False)
    with pytest.raises(ConfigError, match="schedule file not found"):
        engine.generate(prompts, GREEDY, schedule="/nonexistent/s.json", progress=False)
    with pytest.raises(ConfigError, match="empty"):
        engine.generate([[]], GREEDY, progress=False)
    with pytest.raises(ConfigError, match="token ids must lie"):
        engine.generate([[1, 100_000]], GREEDY, progress=False)
    with pytest.raises(ConfigError, match="logprobs_topk"):
        SamplingParams(logprobs_topk=21)
    assert engine.pool_usage()["used_pages"] == 0


def test_paper_preset_runs(tiny_model_dir):
    """Presets use 16-token pages: an engine with page_size 16 runs them."""
    eng = make_engine(tiny_model_dir, page_size=16, num_kv_pages=64)
    (rollout,) = eng.generate(random_prompts([10]), GREEDY, schedule="qwen3-4b-0.86", progress=False)
    assert rollout.meta["schedule"] == "qwen3-4b-0.86" and len(rollout.token_ids) == 24
