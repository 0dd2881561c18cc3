"""GRPO pieces: group-normalised advantages, truncated importance weights (TIS / ICEPOP), PPO-clip loss.

Three policies meet here (all log-probs are of the sampled tokens, temperature applied):
  pi_rollout  the engine's (possibly sparse) sampling policy;
  pi_old      the dense policy *before* this step's updates (dense recompute, no grad);
  pi_theta    the dense policy being trained.
The PPO ratio is pi_theta / pi_old; the rollout correction is a fixed per-token weight from pi_old / pi_rollout —
computed once per batch from the old log-probs, never from the moving pi_theta.
These functions are shared with the OpenRLHF integration; keep them free of trainer state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); the std is the unbiased one (torch's default).

    Groups of one sample, and groups whose rewards are all equal, get advantage 0.
    """
    rewards = rewards.float()
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    adv = torch.zeros_like(rewards)
    for g in group_ids.unique():
        idx = group_ids == g
        r = rewards[idx]
        if r.numel() < 2 or bool((r == r[0]).all()):
            continue
        adv[idx] = (r - r.mean()) / (r.std() + eps)
    return adv


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class ISWeights:
    weights: torch.Tensor  # [N, L] detached per-token weight (0 outside the response mask)
    truncated: torch.Tensor  # [N, L] bool: tokens whose raw ratio was capped (TIS) or masked out (ICEPOP)
    ratio: torch.Tensor  # [N, L] raw pi_old / pi_rollout


def importance_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    cap: float = 2.0,
    icepop: bool = False,
    icepop_low: float = 0.5,
    icepop_high: float = 2.0,
) -> ISWeights:
    """Token-level rollout correction from the OLD dense log-probs.

    TIS: w = min(pi_old / pi_rollout, cap). ICEPOP: w = ratio inside [icepop_low, icepop_high], else 0 (the
    token is dropped from the gradient).
    """
    if old_logprobs.shape != rollout_logprobs.shape or old_logprobs.shape != response_mask.shape:
        raise ValueError(
            f"old {tuple(old_logprobs.shape)}, rollout {tuple(rollout_logprobs.shape)} and mask "
            f"{tuple(response_mask.shape)} log-prob shapes differ"
        )
    mask = response_mask.bool()
    log_ratio = (old_logprobs.detach().float() - rollout_logprobs.float()).masked_fill(~mask, 0.0)
    ratio = log_ratio.clamp(max=30.0).exp()
    if icepop:
        keep = (ratio >= icepop_low) & (ratio <= icepop_high)
        weights = torch.where(keep, ratio, torch.zeros_like(ratio))
        truncated = ~keep & mask
    else:
        weights = ratio.clamp(max=cap)
        truncated = (ratio > cap) & mask
    return ISWeights(weights=weights.masked_fill(~mask, 0.0), truncated=truncated, ratio=ratio)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    pg_loss: torch.Tensor  # detached policy-gradient part (sum over tokens / num_tokens)
    clip_frac: torch.Tensor  # fraction of response tokens whose ratio was clipped (sum / num_tokens)
    ratio_mean: torch.Tensor  # mean pi_theta / pi_old over response tokens (sum / num_tokens)
    entropy: torch.Tensor  # mean entropy over response tokens (sum / num_tokens)
    num_tokens: float


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    is_weights: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    num_tokens: float | None = None,
) -> LossOutput:
    """Token-mean PPO-clip (clip-higher) loss, each token's term scaled by its importance weight.

    per token: w * max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - old_logp).
    The sum over `response_mask` is divided by `num_tokens` (default: the tokens of this call); pass the token count
    of the whole mini-batch to accumulate gradients over micro-batches into exactly its token mean.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == response_mask.shape):
        raise ValueError(
            f"shapes differ: logprobs {tuple(logprobs.shape)}, old {tuple(old_logprobs.shape)}, advantages "
            f"{tuple(advantages.shape)}, mask {tuple(response_mask.shape)}"
        )
    mask = response_mask.to(logprobs.dtype)
    denom = float(num_tokens) if num_tokens is not None else max(float(mask.sum()), 1.0)
    log_ratio = (logprobs - old_logprobs.detach()).masked_fill(~response_mask.bool(), 0.0)
    ratio = log_ratio.clamp(max=30.0).exp()
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    pg_loss = (per_token * mask).sum() / denom
    loss = pg_loss
    ent_sum = torch.zeros((), device=logprobs.device)
    if entropy is not None:
        ent_sum = (entropy * mask).sum()
        if entropy_coef:
            loss = loss - entropy_coef * ent_sum / denom
    with torch.no_grad():
        clip_frac = ((clipped > unclipped).to(mask.dtype) * mask).sum() / denom
        ratio_mean = (ratio * mask).sum() / denom
    return LossOutput(
        loss=loss,
        pg_loss=pg_loss.detach(),
        clip_frac=clip_frac,
        ratio_mean=ratio_mean,
        entropy=ent_sum.detach() / denom,
        num_tokens=denom,
    )
