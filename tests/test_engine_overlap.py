"""Overlapped decoding (engine/overlap.py): launching step N+1 before step N is read changes no rollout.

On the CPU, SPARROW_OVERLAP=1 runs the same loop (the "next" step runs after this one, fed this one's tokens), so the
bookkeeping is tested everywhere: rows of requests that stopped are dropped, their pages freed only after the step
that still wrote them, requests at their length end the chain, waiting requests are admitted once others stop. The
`gpu` case checks the real thing: tokens fed on the device, inputs from pinned memory, no host sync in between.
"""

from __future__ import annotations

import pytest
from engine_helpers import make_engine, random_prompts

from sparrow_sgl.engine import SamplingParams
from sparrow_sgl.engine.overlap import DecodeLaunch, overlap_mode
from sparrow_sgl.engine.sequence import Sequence


def _generate(engine, monkeypatch, mode, prompts, params, schedule):
    monkeypatch.setenv("SPARROW_OVERLAP", mode)
    return engine.generate(prompts, params, schedule=schedule, progress=False)


def _stop_tokens(rollouts, step: int) -> tuple[int, ...]:
    """Tokens that some rollouts produce early: stopping on them ends requests at different steps."""
    return tuple(sorted({r.token_ids[step] for r in rollouts[::3]}))


def _assert_same(a, b):
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.finish_reason for r in a] == [r.finish_reason for r in b]
    assert [r.topk_ids for r in a] == [r.topk_ids for r in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
        assert x.meta["decode_steps"] == y.meta["decode_steps"]
        assert x.meta["kv_tokens_mean"] == pytest.approx(y.meta["kv_tokens_mean"])


@pytest.mark.parametrize("schedule", ["dense", "fixed:16"])
def test_overlap_changes_no_rollout(tiny_model_dir, monkeypatch, schedule):
    """Stops at different steps, mixed lengths, 3 samples a prompt and max_num_seqs below the requests (so waiting
    groups are admitted after others stop): the same tokens, log-probs, top-k and attended KV as without overlap."""
    engine = make_engine(tiny_model_dir, max_num_seqs=4)
    prompts = random_prompts([5, 23, 11, 40], seed=8)
    base = SamplingParams(temperature=1.0, max_new_tokens=20, n=3, seed=5, ignore_eos=True, logprobs_topk=2)
    probe = _generate(engine, monkeypatch, "0", prompts, base, schedule)
    params = SamplingParams(temperature=1.0, max_new_tokens=20, n=3, seed=5, logprobs_topk=2,
                            stop_token_ids=_stop_tokens(probe, 4))
    ref = _generate(engine, monkeypatch, "0", prompts, params, schedule)
    assert {r.finish_reason for r in ref} == {"stop", "length"}  # the case under test: some stop mid-run
    overlapped = _generate(engine, monkeypatch, "1", prompts, params, schedule)
    _assert_same(overlapped, ref)
    assert engine.pool_usage()["used_pages"] == 0
    assert engine.last_run.decode_steps >= max(r.meta["decode_steps"] for r in ref)


def test_overlap_with_greedy_and_mixed_lengths(tiny_model_dir, monkeypatch):
    """Requests of one batch reaching their length at different steps (the prompt fills max_model_len)."""
    engine = make_engine(tiny_model_dir, max_model_len=48)
    prompts = random_prompts([40, 12, 30], seed=2)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    ref = _generate(engine, monkeypatch, "0", prompts, params, "dense")
    assert sorted(len(r.token_ids) for r in ref) == [8, 16, 16]
    _assert_same(_generate(engine, monkeypatch, "1", prompts, params, "dense"), ref)


def test_a_launch_feeds_the_next_only_while_every_request_has_tokens_left(monkeypatch):
    params = SamplingParams(max_new_tokens=4)
    seqs = [Sequence(i, [1, 2], params, 4) for i in range(2)]
    launch = DecodeLaunch(seqs, ready=None)
    monkeypatch.setenv("SPARROW_OVERLAP", "1")
    seqs[0].output_ids = [7, 7]  # this step gives the 3rd token: a 4th is still to come
    seqs[1].output_ids = [7]
    assert launch.can_feed_next()
    seqs[0].output_ids = [7, 7, 7]  # this step gives the last token
    assert not launch.can_feed_next()
    seqs[0].output_ids, seqs[1].finish_reason = [7], "stop"
    assert not launch.can_feed_next()
    seqs[1].finish_reason = None
    monkeypatch.setenv("SPARROW_OVERLAP", "auto")  # auto: only a GPU step sampled in its graph
    assert not launch.can_feed_next()
    monkeypatch.setenv("SPARROW_OVERLAP", "0")
    assert not launch.can_feed_next()


def test_a_bad_overlap_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("SPARROW_OVERLAP", "sometimes")
    with pytest.raises(ValueError, match="SPARROW_OVERLAP='sometimes'"):
        overlap_mode()


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["dense", "fixed:64"])
def test_overlap_on_cuda_changes_no_rollout(tiny_model_dir, monkeypatch, schedule):
    """The default on CUDA (auto: steps chained on the device) against SPARROW_OVERLAP=0. float32: a stopped
    request's dropped row changes a step's batch (so its kernels' tiling), which must not flip a near-tie."""
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine

    engine = Engine(EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="float32", max_model_len=256,
                                 kv_gb=0.25, max_num_seqs=4))
    prompts = [[5, 9, 13, 21], list(range(10, 160)), list(range(40, 75))]  # 150 tokens: fixed:64 selects pages
    base = SamplingParams(temperature=1.0, max_new_tokens=40, n=3, seed=7, ignore_eos=True, logprobs_topk=3)
    probe = _generate(engine, monkeypatch, "0", prompts, base, schedule)
    params = SamplingParams(temperature=1.0, max_new_tokens=40, n=3, seed=7, logprobs_topk=3,
                            stop_token_ids=_stop_tokens(probe, 6))
    ref = _generate(engine, monkeypatch, "0", prompts, params, schedule)
    assert {r.finish_reason for r in ref} == {"stop", "length"}
    overlapped = _generate(engine, monkeypatch, "auto", prompts, params, schedule)
    assert any(step._launches > 1 for step in engine.runner.gpu_decoder().steps.values())
    _assert_same(overlapped, ref)
    assert engine.pool_usage()["used_pages"] == 0
