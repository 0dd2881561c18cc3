"""Dense log-probs of the sampled tokens with the trainable policy (transformers `Qwen3ForCausalLM`).

`token_logprobs` is the one forward used both for the no-grad "old" recompute and, with autograd, for the update,
so the two agree bit for bit. `recompute_old` also measures the per-token acceptance rate against the rollout's
distributions while the dense logits are at hand (they are too large to keep for a whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow_sgl.mismatch import acceptance_rate, acceptance_rate_vs_dense_topk
from sparrow_sgl.rl.batch import RolloutBatch


@dataclass
class TokenLogprobs:
    logprobs: torch.Tensor  # [b, L] log-prob of token j at column j (0 at column 0)
    entropy: torch.Tensor  # [b, L] entropy of the distribution that produced token j
    log_dist: torch.Tensor | None = None  # [b, L, V] full log-distribution for token j (only when asked)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    keep_dist: bool = False,
    entropy_grad: bool = False,
) -> TokenLogprobs:
    """One forward; column j of every output refers to token j, predicted from the logits at j - 1.

    The entropy is detached unless `entropy_grad` (an entropy bonus needs its gradient; monitoring does not).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False).logits
    log_dist = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    picked = log_dist.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ent_src = log_dist if entropy_grad else log_dist.detach()
    entropy = -(ent_src.exp() * ent_src).sum(-1)
    pad = torch.zeros_like(picked[:, :1])
    full = None
    if keep_dist:
        full = torch.cat([torch.zeros_like(log_dist[:, :1]), log_dist], dim=1)
    return TokenLogprobs(torch.cat([pad, picked], 1), torch.cat([pad, entropy], 1), full)


@dataclass
class OldPolicy:
    logprobs: torch.Tensor  # [N, L] dense log-probs before the update (0 outside the response)
    entropy: torch.Tensor  # [N, L]
    alpha: torch.Tensor | None  # [N, L] acceptance rate dense vs rollout (NaN outside the response)
    log_dist: torch.Tensor | None = None  # [N, L, V] full dense log-distributions (only when asked: large)


@torch.no_grad()
def recompute_old(
    model: torch.nn.Module,
    batch: RolloutBatch,
    micro_batch_size: int,
    temperature: float = 1.0,
    rollout_dists: list[torch.Tensor] | None = None,
    topk: bool = False,
    keep_dist: bool = False,
) -> OldPolicy:
    """Dense log-probs and entropy of every sampled token, micro-batched, plus the acceptance rate per token.

    rollout_dists: per row, the rollout's full log-distributions over its generated tokens ([T_i, V]), for the
    full-vocabulary acceptance rate; `topk`: use the batch's rollout top-k lists (lower bound) instead.
    keep_dist: also return the full dense log-distributions [N, L, V] (for DistillSparse's exact KL).
    """
    was_training = model.training
    model.eval()
    n, length = batch.input_ids.shape
    logprobs, entropy = torch.zeros(n, length), torch.zeros(n, length)
    alpha = torch.full((n, length), float("nan")) if rollout_dists is not None or topk else None
    log_dist = None
    device = next(model.parameters()).device
    try:
        for start in range(0, n, micro_batch_size):
            mb = batch.select(slice(start, start + micro_batch_size)).to(device)
            want_dist = alpha is not None or keep_dist
            out = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature, keep_dist=want_dist)
            width = mb.input_ids.shape[1]
            rows = slice(start, start + len(mb))
            mask = mb.response_mask
            logprobs[rows, :width] = (out.logprobs * mask).cpu()
            entropy[rows, :width] = (out.entropy * mask).cpu()
            if alpha is not None:
                alpha[rows, :width] = _alpha(out.log_dist, mb, rollout_dists, start, topk).cpu()
            if keep_dist:
                if log_dist is None:
                    log_dist = torch.zeros(n, length, out.log_dist.shape[-1])
                log_dist[rows, :width] = out.log_dist.cpu()
    finally:
        model.train(was_training)
    return OldPolicy(logprobs, entropy, alpha, log_dist)


def _alpha(log_dist, mb: RolloutBatch, rollout_dists, row0: int, topk: bool) -> torch.Tensor:
    out = torch.full(mb.input_ids.shape, float("nan"), device=log_dist.device)
    for i in range(len(mb)):
        p, t = int(mb.prompt_lens[i]), int(mb.response_lens[i])
        if t == 0:
            continue
        dense = log_dist[i, p : p + t]
        if topk:
            out[i, p : p + t] = acceptance_rate_vs_dense_topk(
                dense, mb.rollout_topk_ids[i, p : p + t], mb.rollout_topk_logprobs[i, p : p + t]
            )
        else:
            sparse = rollout_dists[row0 + i].to(dense.device)
            if sparse.shape != dense.shape:
                raise ValueError(
                    f"row {row0 + i}: rollout distributions {tuple(sparse.shape)} vs dense {tuple(dense.shape)}"
                )
            out[i, p : p + t] = acceptance_rate(dense, sparse)
    return out
