"""Acceptance rate (full vocabulary and top-k bound) and per-bin tail statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparrow_sgl.mismatch import acceptance_rate, acceptance_rate_topk, min_tail, tail_by_bin


def random_logp(*shape, seed=0, sharpness=3.0):
    g = torch.Generator().manual_seed(seed)
    return (sharpness * torch.randn(*shape, generator=g)).log_softmax(-1)


def test_identical_distributions_accept_everything():
    p = random_logp(5, 7, 50)
    torch.testing.assert_close(acceptance_rate(p, p), torch.ones(5, 7))


def test_disjoint_distributions_accept_nothing():
    a = torch.full((3, 10), float("-inf"))
    b = torch.full((3, 10), float("-inf"))
    a[:, :5] = torch.log(torch.tensor(0.2))
    b[:, 5:] = torch.log(torch.tensor(0.2))
    torch.testing.assert_close(acceptance_rate(a, b), torch.zeros(3))


def test_acceptance_rate_is_symmetric_and_equals_one_minus_tv():
    p, q = random_logp(4, 100, seed=1), random_logp(4, 100, seed=2)
    alpha = acceptance_rate(p, q)
    torch.testing.assert_close(alpha, acceptance_rate(q, p))
    tv = 0.5 * (p.exp() - q.exp()).abs().sum(-1)
    torch.testing.assert_close(alpha, 1 - tv, atol=1e-6, rtol=0)


def test_bf16_inputs_are_computed_in_float32():
    p, q = random_logp(6, 1000, seed=3), random_logp(6, 1000, seed=4)
    out = acceptance_rate(p.bfloat16(), q.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, acceptance_rate(p, q), atol=2e-2, rtol=0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        acceptance_rate(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("k", [1, 5, 20, 100])
def test_topk_bound_never_exceeds_full_value(k):
    p, q = random_logp(8, 100, seed=5), random_logp(8, 100, seed=6)
    full = acceptance_rate(p, q)
    lp_a, ids_a = p.topk(k, -1)
    lp_b, ids_b = q.topk(k, -1)
    bound = acceptance_rate_topk(ids_a, lp_a, ids_b, lp_b)
    assert bool((bound <= full + 1e-6).all())
    if k == 100:
        torch.testing.assert_close(bound, full)


def test_topk_identical_lists_give_their_mass():
    p = random_logp(3, 50, seed=7, sharpness=6.0)
    lp, ids = p.topk(10, -1)
    torch.testing.assert_close(acceptance_rate_topk(ids, lp, ids, lp), lp.exp().sum(-1))


def test_tail_by_bin_agrees_with_numpy_percentile():
    rng = np.random.default_rng(0)
    positions = rng.integers(0, 10_000, size=5000)
    alpha = 1 - rng.beta(0.5, 20, size=5000)
    stats = tail_by_bin(torch.tensor(alpha), torch.tensor(positions), bin_tokens=2048, q=0.05)
    assert len(stats) == 5
    for i, s in enumerate(stats):
        values = alpha[(positions >= 2048 * i) & (positions < 2048 * (i + 1))]
        assert (s.start, s.end, s.count) == (2048 * i, 2048 * (i + 1), values.size)
        assert s.tail == pytest.approx(np.percentile(values, 5))
        assert s.mean == pytest.approx(values.mean())
    assert min_tail(stats) == pytest.approx(min(s.tail for s in stats))


def test_empty_bins_are_reported():
    stats = tail_by_bin([0.9, 0.8, 0.95], [10, 20, 5000], bin_tokens=2048, num_bins=4)
    assert [s.count for s in stats] == [2, 0, 1, 0]
    assert stats[1].tail is None and stats[1].mean is None
    assert tail_by_bin([], []) == []
    assert min_tail(tail_by_bin([], [], num_bins=2)) is None


def test_tail_by_bin_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in size"):
        tail_by_bin([0.5, 0.4], [1])
    with pytest.raises(ValueError, match="bin_tokens"):
        tail_by_bin([0.5], [1], bin_tokens=0)
