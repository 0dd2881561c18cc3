"""The embedded rollout backend turns OpenRLHF's one-request-per-sample batches into one prompt with n samples, so a
long prompt is prefilled and stored once for all its samples; rollouts come back in request order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparrow_sgl.openrlhf.embedded_backend import EmbeddedBackend, engine_params

A = [5, 9, 13, 21, 34, 55, 89, 8, 2, 7, 11, 40, 33, 21, 9, 4, 16, 25, 36, 49]  # 20 tokens: shared pages
B = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]


def _params(seed=None) -> SimpleNamespace:
    """What OpenRLHF sends (vLLM's SamplingParams fields)."""
    return SimpleNamespace(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=6, seed=seed, stop_token_ids=None)


def backend_params():
    return engine_params(_params(), topk=0)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return EmbeddedBackend(str(tiny_model_dir), seed=0, max_model_len=256, page_size=4, num_kv_pages=400)


def _spy(backend, monkeypatch) -> list[tuple[int, int]]:
    calls = []
    real = backend.engine.generate

    def generate(prompts, params, schedule, progress):
        calls.append((len(prompts), params.n))
        return real(prompts, params, schedule, progress=progress)

    monkeypatch.setattr(backend.engine, "generate", generate)
    return calls


def test_samples_of_one_prompt_become_one_prompt_with_n_samples(backend, monkeypatch):
    calls = _spy(backend, monkeypatch)
    prompts = [A, B, A, B, A, B, A, B]  # OpenRLHF's order may interleave prompts
    rollouts = backend.generate(prompts, _params(), backend.resolve_schedule("dense"), topk=0)
    assert calls == [(2, 4)]
    assert [r.prompt_ids for r in rollouts] == prompts
    assert all(len(r.token_ids) == 6 and len(r.logprobs) == 6 for r in rollouts)
    assert len({tuple(r.token_ids) for r in rollouts[::2]}) > 1  # A's samples are samples, not copies


def test_prompts_that_come_a_different_number_of_times_go_in_one_call_per_count(backend, monkeypatch):
    calls = _spy(backend, monkeypatch)
    rollouts = backend.generate([B, A, A, B, A], _params(), backend.resolve_schedule("fixed:16"), topk=3)
    assert sorted(calls) == [(1, 2), (1, 3)]
    assert [r.prompt_ids for r in rollouts] == [B, A, A, B, A]
    assert all(r.topk_ids is not None and len(r.topk_ids) == 6 for r in rollouts)


def test_a_seeded_batch_is_grouped_too_and_repeats_itself(backend, monkeypatch):
    """The engine's seed is the call's (each sample draws from (seed, prompt, sample)), as before grouping."""
    calls = _spy(backend, monkeypatch)
    runs = [backend.generate([A, A, B], _params(seed=7), backend.resolve_schedule("dense"), topk=0) for _ in range(2)]
    assert calls == [(1, 2), (1, 1)] * 2
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]
    assert runs[0][0].token_ids != runs[0][1].token_ids


def test_grouping_stores_a_prompt_once(backend):
    engine = backend.engine
    engine.generate([A] * 6, backend_params(), "dense", progress=False)  # six requests of n = 1: six prefills
    apart = engine.pool_usage()["peak_used_pages"]
    backend.generate([A] * 6, _params(), backend.resolve_schedule("dense"), topk=0)
    together = engine.pool_usage()["peak_used_pages"]
    assert together < apart


def test_each_rollout_says_what_graph_captures_its_call_made(backend, monkeypatch):
    runner = backend.engine.runner
    counts = iter([(3, 1.0), (5, 1.75)])  # before / after the call (a GPU decoder captured 2 graphs in 0.75 s)
    monkeypatch.setattr(runner, "graph_captures", lambda: next(counts))
    out = backend.generate([A, B], _params(), backend.resolve_schedule("dense"), topk=0)
    assert [(r.meta["graph_captures"], r.meta["graph_capture_s"]) for r in out] == [(2, 0.75), (2, 0.75)]
    meta = out[0].meta  # the call's engine wall: prefill, decode, per decode step
    assert meta["prefill_s"] > 0 and meta["decode_s"] > 0 and meta["decode_ms_per_step"] > 0
    monkeypatch.undo()
    assert runner.graph_captures() == (0, 0.0)  # CPU: no CUDA graphs
