"""GRPO loss pieces against hand-computed values, and the masking/old-log-prob pitfalls."""

import math

import pytest
import torch

from sparrow_sgl.rl.batch import RolloutBatch
from sparrow_sgl.rl.loss import group_advantages, importance_weights, masked_mean, ppo_clip_loss
from sparrow_sgl.rollout import Rollout


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = group_advantages(rewards, groups, eps=0.0)
    # group 0: mean 0.25, unbiased std sqrt(((0.75)^2 + 3 * 0.25^2) / 3) = 0.5
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    assert adv[4:6].tolist() == [0.0, 0.0]  # equal rewards -> no signal (eps keeps it finite)
    assert adv[6].item() == 0.0  # a group of one


def test_group_advantages_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must be equal 1-D"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def test_tis_weights_hand_computed():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2, 0.3]]))
    rollout = torch.log(torch.tensor([[0.5, 0.3, 0.4, 0.3]]))
    mask = torch.tensor([[False, True, True, True]])
    w = importance_weights(old, rollout, mask, cap=2.0)
    # ratios 0.9/0.3 = 3 -> capped at 2; 0.2/0.4 = 0.5; 1; prompt token -> 0
    assert w.weights.tolist()[0] == pytest.approx([0.0, 2.0, 0.5, 1.0])
    assert w.truncated.tolist() == [[False, True, False, False]]


def test_icepop_masks_tokens_outside_band():
    old = torch.log(torch.tensor([[0.9, 0.2, 0.3, 0.3]]))
    rollout = torch.log(torch.tensor([[0.3, 0.5, 0.3, 0.2]]))  # ratios 3, 0.4, 1, 1.5
    mask = torch.ones(1, 4, dtype=torch.bool)
    w = importance_weights(old, rollout, mask, icepop=True, icepop_low=0.5, icepop_high=2.0)
    assert w.weights.tolist()[0] == pytest.approx([0.0, 0.0, 1.0, 1.5])
    assert w.truncated.tolist() == [[True, True, False, False]]


def test_tis_is_exactly_one_when_engine_and_trainer_agree():
    logp = torch.randn(3, 7).clamp(max=0)
    w = importance_weights(logp, logp.clone(), torch.ones(3, 7, dtype=torch.bool))
    assert torch.equal(w.weights, torch.ones(3, 7))
    assert not w.truncated.any()


def test_ppo_clip_hand_computed():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # token terms max(-A r, -A clip(r)): A=+1, r=1.5 -> -min(1.5, 1.28) = -1.28 (clipped)
    # A=+1, r=0.5 -> -0.5 (the lower clip does not bind for A > 0); A=-1, r=1.1 -> 1.1; A=-1, r=0.7 -> 0.8
    expected = (-1.28 - 0.5 + 1.1 + 0.8) / 4
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(0.5)
    out.loss.backward()
    grad = logp.grad[0]
    assert grad[0].item() == 0.0 and grad[3].item() == 0.0  # clipped tokens carry no gradient
    assert grad[1].item() == pytest.approx(-0.5 / 4) and grad[2].item() == pytest.approx(1.1 / 4)


def test_ppo_loss_scales_each_token_by_its_is_weight():
    logp = torch.zeros(1, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    w = torch.tensor([[2.0, 0.5, 0.0]])
    out = ppo_clip_loss(logp, torch.zeros(1, 3), adv, mask, is_weights=w)
    assert out.loss.item() == pytest.approx(-(2.0 + 0.5 + 0.0) / 3)


def test_tis_uses_old_logprobs_not_current_ones():
    """Pitfall: the rollout correction compares the OLD dense policy with the rollout, fixed over the update."""
    rollout = torch.log(torch.tensor([[0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    current = torch.log(torch.tensor([[0.9, 0.9]]))  # the policy has moved after an optimizer step
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = importance_weights(old, rollout, mask)
    assert torch.equal(w.weights, torch.ones(1, 2))  # not min(0.9 / 0.5, C) = 1.8
    # and the PPO ratio of the loss is current / old, while the weight stays what it was
    out = ppo_clip_loss(current, old, torch.ones(1, 2), mask, is_weights=w.weights, clip_high=10.0)
    assert out.ratio_mean.item() == pytest.approx(1.8)
    assert out.loss.item() == pytest.approx(-1.8)


def test_loss_and_metrics_use_the_response_mask_not_the_attention_mask():
    """Pitfall: prompt tokens are inside the attention mask but must never enter the loss or a per-token metric."""
    r = Rollout(prompt_ids=[5, 6, 7], token_ids=[8, 9], logprobs=[-0.5, -1.0], prompt_index=0)
    batch = RolloutBatch.from_rollouts([r], rewards=[1.0], advantages=[1.0])
    assert batch.response_mask.tolist() == [[False, False, False, True, True]]
    assert batch.attention_mask.all()
    logp = torch.tensor([[-9.0, -9.0, -9.0, -0.5, -1.0]])  # garbage on prompt tokens
    loss_resp = ppo_clip_loss(logp, logp, batch.advantages, batch.response_mask)
    loss_attn = ppo_clip_loss(logp, torch.zeros_like(logp), batch.advantages, batch.attention_mask)
    assert loss_resp.loss.item() == pytest.approx(-1.0)  # 2 tokens, ratio 1, advantage 1
    assert loss_attn.loss.item() != pytest.approx(-1.0)
    assert masked_mean(logp, batch.response_mask).item() == pytest.approx(-0.75)
    w = importance_weights(logp, batch.rollout_logprobs, batch.response_mask)
    assert w.weights.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]


def test_token_mean_accumulates_exactly_over_micro_batches():
    torch.manual_seed(0)
    logp = torch.randn(4, 6).clamp(max=0).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(4, 6)
    adv = torch.randn(4, 1).expand(4, 6).clone()
    mask = torch.rand(4, 6) > 0.3
    full = ppo_clip_loss(logp, old, adv, mask).loss
    (g_full,) = torch.autograd.grad(full, logp)
    total = float(mask.sum())
    parts = [
        ppo_clip_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], num_tokens=total).loss
        for i in (0, 2)
    ]
    (g_acc,) = torch.autograd.grad(sum(parts), logp)
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(g_full, g_acc, atol=1e-7)


def test_ppo_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))


def test_ratio_overflow_is_finite():
    w = importance_weights(torch.zeros(1, 1), torch.full((1, 1), -1000.0), torch.ones(1, 1, dtype=torch.bool))
    assert math.isfinite(w.ratio.item()) and w.weights.item() == 2.0
