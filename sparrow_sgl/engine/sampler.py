"""Token sampling with per-request temperature, top-k, top-p and seeded generators.

Log-prob semantics (what `Rollout.logprobs` holds): the log-probability of the chosen token under the distribution
it was actually drawn from — logits / temperature, then top-k and top-p filtering, renormalised. The top-k lists
come from that same distribution (filtered-out tokens have -inf), so a sampled token's log-prob equals its entry in
the list when present. Greedy rows (temperature 0) report the plain softmax of the logits (temperature 1, no
filtering), since the distribution they "sample" is a point mass.

Each row draws one uniform number from its own CPU generator and inverts the CDF, so a request's tokens depend only
on its seed and its logits, never on which other requests share the batch.

On CUDA, a batch without top-k / top-p filtering is sampled by one Triton launch (attention/kernels/triton_sample.py:
the same rule and log-probs up to float32 summation order), its inputs in one host-to-device copy and every output
in one device-to-host copy; SPARROW_FUSED_SAMPLER=0 keeps the torch path. The torch path is the reference.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from sparrow_sgl.engine.sequence import Sequence


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float]
    topk_ids: list[list[int]]  # per row, empty when the row asked for none
    topk_logprobs: list[list[float]]

    def subset(self, rows: list[int]) -> SampleOutput:
        """These rows only, in the given order."""
        fields = (self.token_ids, self.logprobs, self.topk_ids, self.topk_logprobs)
        return SampleOutput(*([values[i] for i in rows] for values in fields))


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


FUSED_ENV = "SPARROW_FUSED_SAMPLER"
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def unfiltered(seqs: list[Sequence]) -> bool:
    """No row samples with top-k or top-p filtering (what the fused sampler serves)."""
    return all(s.params.greedy or (s.params.top_k <= 0 and s.params.top_p >= 1.0) for s in seqs)


def fused_enabled() -> bool:
    return _HAS_TRITON and os.environ.get(FUSED_ENV, "1").strip() != "0"


def fused_applies(logits: torch.Tensor, seqs: list[Sequence]) -> bool:
    """The Triton sampler serves this batch: CUDA, Triton, SPARROW_FUSED_SAMPLER not 0, no row filtered by top-k/p."""
    return logits.is_cuda and fused_enabled() and unfiltered(seqs)


class Sampler:
    def __init__(self, fused: bool | None = None) -> None:
        """fused: None = the Triton sampler where `fused_applies`; True forces it (tests, Triton's interpreter on
        CPU; filtered rows still take the torch path); False = always the torch path."""
        self.fused = fused
        self._host: torch.Tensor | None = None  # reused (pinned on CUDA) staging of the per-row inputs

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleOutput:
        if fused_applies(logits, seqs) if self.fused is None else (self.fused and unfiltered(seqs)):
            return self._fused(logits, seqs)
        logp = sampling_logprobs(logits, seqs)
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logp.device)
        uniform = torch.tensor([self._uniform(s) for s in seqs], device=logp.device)
        cdf = logp.exp().cumsum(dim=-1)
        drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp(max=logp.shape[-1] - 1)
        token_ids = torch.where(greedy[:, None], logp.argmax(dim=-1, keepdim=True), drawn)
        chosen = logp.gather(-1, token_ids)
        out = SampleOutput(token_ids[:, 0].tolist(), chosen[:, 0].tolist(), [], [])
        k_max = max(s.params.logprobs_topk for s in seqs)
        top_vals = top_ids = [[]] * len(seqs)
        if k_max:  # two device-to-host copies a step, each turned into lists once (not per row)
            top_vals, top_ids = (t.cpu().tolist() for t in logp.topk(k_max, dim=-1))
        for seq, ids, vals in zip(seqs, top_ids, top_vals):
            k = seq.params.logprobs_topk
            out.topk_ids.append(ids[:k])
            out.topk_logprobs.append(vals[:k])
        return out

    def rows(self, seqs: list[Sequence]) -> list[list[float]]:
        """The fused sampler's per-row inputs [3][n]: 1 / temperature (1 for greedy rows), the row's uniform (drawn
        from its generator, as the torch path draws it), greedy flag."""
        return [
            [1.0 if s.params.greedy else 1.0 / (s.params.temperature or 1.0) for s in seqs],
            [self._uniform(s) for s in seqs],
            [float(s.params.greedy) for s in seqs],
        ]

    @staticmethod
    def unpack(packed: list[list[float]], seqs: list[Sequence], k_max: int, first: int = 2) -> SampleOutput:
        """SampleOutput from per-row [token, log-prob, (columns before `first`), topk ids (k_max), topk log-probs]."""
        out = SampleOutput([int(r[0]) for r in packed], [r[1] for r in packed], [], [])
        for seq, r in zip(seqs, packed):
            k = seq.params.logprobs_topk
            out.topk_ids.append([int(t) for t in r[first : first + k]])
            out.topk_logprobs.append(r[first + k_max : first + k_max + k])
        return out

    def _fused(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleOutput:
        from sparrow_sgl.attention.kernels.triton_sample import sample_packed

        host = self._staging(len(seqs), logits.is_cuda)
        host.copy_(torch.tensor(self.rows(seqs)))
        inputs = host.to(logits.device, non_blocking=True)
        k_max = max(s.params.logprobs_topk for s in seqs)
        packed = sample_packed(logits, inputs[0], inputs[1], inputs[2], k_max).cpu().tolist()  # the one copy back
        return self.unpack(packed, seqs, k_max)

    def _staging(self, rows: int, pinned: bool) -> torch.Tensor:
        """A contiguous [3, rows] float32 view of a reused host buffer; reusing it is safe: each call ends with a
        device-to-host copy, which waits for the previous call's host-to-device copy."""
        if self._host is None or self._host.numel() < 3 * rows or self._host.is_pinned() != pinned:
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                self._host = torch.empty(3 * max(rows, 64), dtype=torch.float32, pin_memory=pinned)
        return self._host[: 3 * rows].view(3, rows)

    @staticmethod
    def _uniform(seq: Sequence) -> float:
        """A draw in (0, 1] from the sequence's own generator (greedy rows draw nothing)."""
        if seq.params.greedy:
            return 1.0
        return 1.0 - float(torch.rand((), generator=seq.generator))
