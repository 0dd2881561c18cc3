"""Token sampling with per-request temperature, top-k, top-p and seeded generators.

Log-prob semantics (what `Rollout.logprobs` holds): the log-probability of the chosen token under the distribution
it was actually drawn from — logits / temperature, then top-k and top-p filtering, renormalised. The top-k lists
come from that same distribution (filtered-out tokens have -inf), so a sampled token's log-prob equals its entry in
the list when present. Greedy rows (temperature 0) report the plain softmax of the logits (temperature 1, no
filtering), since the distribution they "sample" is a point mass.

Each row draws one uniform number from its own CPU generator and inverts the CDF, so a request's tokens depend only
on its seed and its logits, never on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow_sgl.engine.sequence import Sequence


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float]
    topk_ids: list[list[int]]  # per row, empty when the row asked for none
    topk_logprobs: list[list[float]]


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top_k (0 = off) and top-p nucleus (1.0 = off)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = (rank >= top_k[:, None]) & (top_k[:, None] > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = drop | (mass_before > top_p[:, None])  # the top token always stays (mass_before = 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sampling_logprobs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Log-probs [B, V] of the distribution each row samples from (see module docstring)."""
    device = logits.device
    temperature = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=device)
    logits = logits.float() / temperature[:, None]
    sampled = [not s.params.greedy for s in seqs]
    top_k = [s.params.top_k if g else 0 for s, g in zip(seqs, sampled)]
    top_p = [s.params.top_p if g else 1.0 for s, g in zip(seqs, sampled)]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = filter_top_k_top_p(logits, torch.tensor(top_k, device=device), torch.tensor(top_p, device=device))
    return torch.log_softmax(logits, dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleOutput:
        logp = sampling_logprobs(logits, seqs)
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logp.device)
        uniform = torch.tensor([self._uniform(s) for s in seqs], device=logp.device)
        cdf = logp.exp().cumsum(dim=-1)
        drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp(max=logp.shape[-1] - 1)
        token_ids = torch.where(greedy[:, None], logp.argmax(dim=-1, keepdim=True), drawn)
        chosen = logp.gather(-1, token_ids)
        out = SampleOutput(token_ids[:, 0].tolist(), chosen[:, 0].tolist(), [], [])
        k_max = max(s.params.logprobs_topk for s in seqs)
        if k_max:  # two device-to-host copies a step, then per-row lists (was 2 x batch small copies, each a sync)
            top_vals, top_ids = (t.cpu() for t in logp.topk(k_max, dim=-1))
        for i, seq in enumerate(seqs):
            k = seq.params.logprobs_topk
            out.topk_ids.append(top_ids[i, :k].tolist() if k else [])
            out.topk_logprobs.append(top_vals[i, :k].tolist() if k else [])
        return out

    @staticmethod
    def _uniform(seq: Sequence) -> float:
        """A draw in (0, 1] from the sequence's own generator (greedy rows draw nothing)."""
        if seq.params.greedy:
            return 1.0
        return 1.0 - float(torch.rand((), generator=seq.generator))
