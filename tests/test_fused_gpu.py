"""Fused elementwise kernels (engine/fused.py, attention/kernels/triton_fused.py) and the centroid-only KV cache.

CPU: the torch reference path and the KV cache's scorer handling. With SPARROW_TRITON_INTERPRET=1 (CPU, triton
installed) the Triton kernels run through Triton's interpreter. There and with `-m gpu` the kernels equal the torch
math to the last bf16 bit for nearly every element (exp/rsqrt/summation order aside). `-m gpu`: the engine with
fused ops generates the same greedy tokens as the unfused engine and transformers.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import hf_model, make_engine, random_prompts
from triton_helpers import DEVICES, HAS_TRITON

from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.engine import SamplingParams, fused
from sparrow_sgl.engine.kv_cache import bytes_per_page

# ---------------------------------------------------------------- CPU: the centroid-only cache

def test_centroid_engine_keeps_no_minmax_and_fits_more_pages(tiny_model_dir):
    assert bytes_per_page(4, 2, 16, 16, torch.bfloat16, minmax=False) < bytes_per_page(4, 2, 16, 16, torch.bfloat16)
    with_copy = bytes_per_page(4, 2, 16, 16, torch.bfloat16, minmax=False, centroid_copy=True)
    assert with_copy - bytes_per_page(4, 2, 16, 16, torch.bfloat16, minmax=False) == 4 * 2 * 16 * 2  # bf16 centroids
    centroid = make_engine(tiny_model_dir, num_kv_pages=None, kv_gb=0.001)
    quest = make_engine(tiny_model_dir, num_kv_pages=None, kv_gb=0.001, scorer="quest")
    assert centroid.kv_cache.num_pages > quest.kv_cache.num_pages
    assert centroid.kv_cache.summaries[0].key_min is None and quest.kv_cache.summaries[0].has_minmax


def test_quest_schedule_on_centroid_engine_is_a_clear_error(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    prompts = random_prompts([20], seed=1)
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    with pytest.raises(ConfigError, match="scorer='quest'"):
        engine.generate(prompts, params, schedule=Schedule.fixed(16, page_size=4, scorer="quest"), progress=False)
    dense_quest = Schedule.dense(page_size=4, scorer="quest")  # a dense schedule never scores pages: allowed
    assert len(engine.generate(prompts, params, schedule=dense_quest, progress=False)[0].token_ids) == 4
    (r,) = engine.generate(prompts, params, schedule="fixed:16", progress=False)  # centroid still works
    assert len(r.token_ids) == 4


def test_reference_ops_are_the_unfused_math():
    torch.manual_seed(0)
    x, r, w = torch.randn(3, 32), torch.randn(3, 32), torch.rand(32) + 0.5
    normed, s = fused.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, x + r) and torch.equal(normed, fused.rms_norm_ref(x + r, w, 1e-6))
    normed, s = fused.add_rms_norm(x, None, w, 1e-6)
    assert s is x and torch.equal(normed, fused.rms_norm_ref(x, w, 1e-6))
    gu = torch.randn(3, 16)
    assert torch.equal(fused.silu_mul(gu), torch.nn.functional.silu(gu[:, :8]) * gu[:, 8:])


# ---------------------------------------------------------------- the kernels (GPU or interpreter)

def _rotary(tokens: int, dim: int, dtype, device):
    pos = torch.arange(tokens, dtype=torch.float32) * 331.0
    inv = 1.0 / (1e6 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def _check(got: torch.Tensor, ref: torch.Tensor, device: str) -> None:
    """float32: to rounding; bf16 on GPU: >= 99% of elements bit-equal, the rest within about 1 bf16 ulp."""
    assert got.shape == ref.shape and got.dtype == ref.dtype and torch.isfinite(got).all()
    if ref.dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert (got == ref).float().mean() >= 0.99


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 16, 4, 2), (37, 128, 16, 8)])  # tokens, head_dim, q heads, kv heads
def test_fused_kernels_match_torch(device, dtype, shape):
    from sparrow_sgl.attention.kernels import triton_fused as tf

    tokens, dim, heads, kv_heads = shape
    hidden, inter = heads * dim + 40, 3 * dim + 8  # not powers of two: masked tails
    g = torch.Generator().manual_seed(tokens)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    x, res = rand(tokens, hidden), rand(tokens, hidden)
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype).to(device)
    normed, summed = tf.add_rms_norm(x, res, w, 1e-6)
    _check(summed, x + res, device)
    _check(normed, fused.rms_norm_ref(x + res, w, 1e-6), device)
    normed, same = tf.add_rms_norm(x, None, w, 1e-6)
    assert same is x
    _check(normed, fused.rms_norm_ref(x, w, 1e-6), device)

    qkv = rand(tokens, (heads + 2 * kv_heads) * dim)
    qw, kw = ((torch.rand(dim, generator=g) + 0.5).to(dtype).to(device) for _ in range(2))
    cos, sin = _rotary(tokens, dim, dtype, device)
    q, k, v = tf.qk_norm_rope(qkv, qw, kw, 1e-6, cos, sin, heads, kv_heads)
    ref_q = fused.apply_rotary(fused.rms_norm_ref(qkv[:, : heads * dim].view(tokens, heads, dim), qw, 1e-6), cos, sin)
    ref_k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    ref_k = fused.apply_rotary(fused.rms_norm_ref(ref_k, kw, 1e-6), cos, sin)
    _check(q, ref_q, device)
    _check(k, ref_k, device)
    assert torch.equal(v, qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim))

    gate_up = rand(tokens, 2 * inter)
    _check(tf.silu_mul(gate_up), torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:], device)


# ---------------------------------------------------------------- GPU: the engine with fused ops

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_engine_equals_unfused_and_transformers(tiny_model_dir, monkeypatch, dtype):
    """float32: greedy tokens identical (fused, unfused, transformers). bf16, where a 1-ulp change can flip a
    near-tie of a random tiny model: every fused greedy token is the unfused model's argmax up to 0.02 nats, and
    teacher-forced distributions agree (total variation)."""
    prompts = random_prompts([30, 52, 9, 70], seed=5)
    params = SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)
    schedules = ("dense", "fixed:64")
    got, scores, unfused_tokens = {}, {}, {}
    for flag in ("1", "0"):  # the switch is read while graphs are captured: set for every call of its engine
        monkeypatch.setenv(fused.FUSED_ENV, flag)
        engine = make_engine(tiny_model_dir, device="cuda", dtype=dtype, page_size=16, num_kv_pages=256)
        for schedule in schedules:
            rollouts = engine.generate(prompts, params, schedule=schedule, progress=False)
            if flag == "1":
                got[schedule] = rollouts
            else:
                unfused_tokens[schedule] = [r.token_ids for r in rollouts]
            responses = [r.token_ids for r in got[schedule]]
            sparse = None if schedule == "dense" else schedule
            scores[flag, schedule] = engine.score(prompts, responses, sparse=sparse, return_full=True)
        del engine
    hf = hf_model(tiny_model_dir, dtype=getattr(torch, dtype)).to("cuda")
    for schedule in schedules:
        if dtype == "float32":
            assert [r.token_ids for r in got[schedule]] == unfused_tokens[schedule]
        for i, (prompt, rollout) in enumerate(zip(prompts, got[schedule])):
            a, b = scores["1", schedule][i].full_logprobs, scores["0", schedule][i].full_logprobs
            assert (a.exp() - b.exp()).abs().sum(-1).max() < (0.02 if dtype == "bfloat16" else 1e-4)
            chosen = b.gather(1, torch.tensor(rollout.token_ids)[:, None])[:, 0]
            assert (b.max(-1).values - chosen).max() <= (0.02 if dtype == "bfloat16" else 0.0)
            torch.testing.assert_close(torch.tensor(rollout.logprobs), scores["1", schedule][i].logprobs, atol=5e-2,
                                       rtol=0)
            if schedule != "dense":
                continue
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + rollout.token_ids[:-1]], device="cuda")).logits[0, len(prompt) - 1 :]
            ref = torch.log_softmax(logits.float(), -1).cpu()
            assert (a.exp() - ref.exp()).abs().sum(-1).max() < (0.05 if dtype == "bfloat16" else 1e-3)
            if dtype == "float32":
                assert ref.argmax(-1).tolist() == rollout.token_ids  # greedy tokens == transformers'
