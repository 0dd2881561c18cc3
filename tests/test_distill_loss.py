"""L_LoRA pieces: k3 and full-vocabulary KL, and the combined loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.loss import distill_loss, full_kl, k3_kl


def _logdists(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g) * 2, -1), torch.log_softmax(
        torch.randn(*shape, generator=g) * 2, -1
    )


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    sparse, dense = torch.randn(4, 50) - 3, torch.randn(4, 50) - 3
    assert (k3_kl(sparse, dense) >= 0).all()
    assert torch.equal(k3_kl(sparse, sparse), torch.zeros_like(sparse))


def test_k3_is_an_unbiased_estimate_of_reverse_kl():
    sparse, dense = _logdists(3, 40, seed=1)
    exact = full_kl(sparse, dense, "reverse")
    # E_{v ~ sparse}[k3(v)] summed exactly over the vocabulary
    expected = (sparse.exp() * k3_kl(sparse, dense)).sum(-1)
    torch.testing.assert_close(expected, exact, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_full_kl_matches_torch_kl_div(mode):
    sparse, dense = _logdists(2, 7, 33, seed=2)
    ours = full_kl(sparse, dense, mode)
    if mode == "reverse":  # KL(sparse ‖ dense): kl_div(input=log dense, target=log sparse)
        ref = F.kl_div(dense, sparse, reduction="none", log_target=True).sum(-1)
    else:
        ref = F.kl_div(sparse, dense, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(full_kl(sparse, sparse, mode), torch.zeros(2, 7), atol=1e-6)


def test_distill_loss_combines_ppo_and_kl_and_only_counts_response_tokens():
    n, length, vocab = 3, 12, 9
    sparse_dist, dense_dist = _logdists(n, length, vocab, seed=3)
    sparse_dist.requires_grad_(True)
    tokens = torch.randint(0, vocab, (n, length))
    sparse_lp = sparse_dist.gather(-1, tokens[..., None]).squeeze(-1)
    dense_lp = dense_dist.gather(-1, tokens[..., None]).squeeze(-1)
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[:, 4:10] = True
    adv = torch.randn(n, 1).expand(n, length) * mask
    rollout_lp = sparse_lp.detach()
    out = distill_loss(sparse_lp, rollout_lp, dense_lp, adv, mask, kl_coef=0.5)
    # at ratio 1 the PPO loss is -mean(advantage)
    torch.testing.assert_close(out.pg_loss, -(adv * mask).sum() / mask.sum())
    torch.testing.assert_close(out.kl, (k3_kl(sparse_lp, dense_lp) * mask).sum() / mask.sum())
    torch.testing.assert_close(out.loss, out.pg_loss + 0.5 * out.kl)
    out.loss.backward()
    assert sparse_dist.grad[~mask].abs().sum() == 0
    full = distill_loss(sparse_lp, rollout_lp, dense_lp, adv, mask, kl_mode="forward", ppo_coef=0.0, kl_coef=1.0,
                        sparse_logdist=sparse_dist, dense_logdist=dense_dist)
    torch.testing.assert_close(full.loss, (full_kl(sparse_dist, dense_dist, "forward") * mask).sum() / mask.sum())


def test_full_kl_needs_distributions():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="log-distributions"):
        distill_loss(x, x, x, x, torch.ones(1, 3, dtype=torch.bool), kl_mode="reverse")
    with pytest.raises(ValueError, match="forward"):
        full_kl(torch.zeros(2, 3), torch.zeros(2, 3), "both")
