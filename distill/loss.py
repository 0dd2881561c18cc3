"""L_LoRA = ppo_coef * L_PPO(sparse) + λ * KL(sparse + φ ‖ dense θ), on the rollout tokens.

- L_PPO(sparse): the RL loop's own PPO-clip (`sparrow_sgl.rl.loss.ppo_clip_loss`) applied to the sparse + LoRA
  policy. Its behaviour policy is the rollout itself (the engine sampled from sparse θ + φ), so the ratio is
  π_φ / π_rollout and no extra importance weight is needed.
- KL: "k3" — the low-variance, always >= 0 estimate of KL(sparse ‖ dense) on tokens sampled from the sparse
  policy (the paper's code, λ = 0.001): with log r = log p_dense − log p_sparse, k3 = r − 1 − log r. Or the exact
  full-vocabulary KL: "reverse" = KL(sparse ‖ dense), "forward" = KL(dense ‖ sparse).
The dense side always comes from the dense recompute the RL step already ran (passed in, detached) — never a
second dense pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow_sgl.rl.loss import ppo_clip_loss

_MAX_LOG_RATIO = 20.0  # keeps exp(log r) finite for tokens the dense policy all but rules out


def k3_kl(sparse_logprobs: torch.Tensor, dense_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(sparse ‖ dense) from the sampled tokens' log-probs (same shape, >= 0)."""
    if sparse_logprobs.shape != dense_logprobs.shape:
        raise ValueError(f"shapes differ: sparse {tuple(sparse_logprobs.shape)} vs dense {tuple(dense_logprobs.shape)}")
    log_r = (dense_logprobs.detach().float() - sparse_logprobs.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.expm1(log_r) - log_r  # r - 1 - log r, accurate near r = 1


def full_kl(sparse_logdist: torch.Tensor, dense_logdist: torch.Tensor, mode: str = "reverse") -> torch.Tensor:
    """Exact per-token KL over the vocabulary from log-distributions [..., V] -> [...].

    reverse: KL(sparse ‖ dense) = Σ q (log q − log p); forward: KL(dense ‖ sparse) = Σ p (log p − log q).
    """
    if sparse_logdist.shape != dense_logdist.shape:
        raise ValueError(f"shapes differ: sparse {tuple(sparse_logdist.shape)} vs dense {tuple(dense_logdist.shape)}")
    q, p = sparse_logdist.float(), dense_logdist.detach().float()
    if mode == "reverse":
        return (q.exp() * (q - p)).sum(-1)
    if mode == "forward":
        return (p.exp() * (p - q)).sum(-1)
    raise ValueError(f"full-vocabulary KL mode must be 'forward' or 'reverse', got {mode!r}")


@dataclass
class DistillLossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    pg_loss: torch.Tensor  # detached PPO part (sum / num_tokens)
    kl: torch.Tensor  # detached KL part (sum / num_tokens), before λ
    clip_frac: torch.Tensor
    num_tokens: float


def distill_loss(
    sparse_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    dense_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_mode: str = "k3",
    kl_coef: float = 0.001,
    ppo_coef: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    sparse_logdist: torch.Tensor | None = None,
    dense_logdist: torch.Tensor | None = None,
    num_tokens: float | None = None,
) -> DistillLossOutput:
    """L_LoRA for one (micro-)batch; per-token tensors [N, L] aligned like `RolloutBatch` (full dists [N, L, V]).

    `num_tokens` normalises sums (pass the whole batch's token count when accumulating over micro-batches).
    """
    mask = response_mask.bool()
    denom = float(num_tokens) if num_tokens is not None else max(float(mask.sum()), 1.0)
    ppo = ppo_clip_loss(
        sparse_logprobs, rollout_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high, num_tokens=denom
    )
    if kl_mode == "k3":
        per_token = k3_kl(sparse_logprobs, dense_logprobs)
    else:
        if sparse_logdist is None or dense_logdist is None:
            raise ValueError(f"kl_mode {kl_mode!r} needs the full sparse and dense log-distributions [N, L, V]")
        per_token = full_kl(sparse_logdist, dense_logdist, kl_mode)
    kl = (per_token * mask).sum() / denom
    loss = ppo_coef * ppo.loss + kl_coef * kl
    return DistillLossOutput(loss, ppo.pg_loss, kl.detach(), ppo.clip_frac, denom)
