"""Per-token sparse-to-dense mismatch (acceptance rate) and its lower-tail statistic per position bin.

acceptance rate alpha_t = sum_v min(p(v), q(v)) = 1 - TV(p, q): 1 means the sparse policy samples exactly as the
dense one. Training stays stable while the 5th percentile of alpha in every position bin stays >= tau.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


def acceptance_rate(logp_dense: torch.Tensor, logp_sparse: torch.Tensor) -> torch.Tensor:
    """sum_v min(p, q) over the last dim of two log-probability tensors [..., V] -> [...] in [0, 1] (float32)."""
    if logp_dense.shape != logp_sparse.shape:
        raise ValueError(f"shapes differ: {tuple(logp_dense.shape)} vs {tuple(logp_sparse.shape)}")
    p = logp_dense.float().exp()
    q = logp_sparse.float().exp()
    return torch.minimum(p, q).sum(-1).clamp(0.0, 1.0)


def acceptance_rate_topk(
    ids_a: torch.Tensor, logp_a: torch.Tensor, ids_b: torch.Tensor, logp_b: torch.Tensor
) -> torch.Tensor:
    """Lower bound of the acceptance rate from top-k lists [..., k] (ids + log-probs) of the two distributions.

    Sums min(p, q) over the union of both lists, a token missing from one list counting as probability 0 there
    (so it adds nothing). Never exceeds the full-vocabulary value.
    """
    if ids_a.shape != logp_a.shape or ids_b.shape != logp_b.shape:
        raise ValueError("each ids tensor must have the shape of its log-prob tensor")
    if ids_a.shape[:-1] != ids_b.shape[:-1]:
        raise ValueError(f"leading dims differ: {tuple(ids_a.shape[:-1])} vs {tuple(ids_b.shape[:-1])}")
    p_a, p_b = logp_a.float().exp(), logp_b.float().exp()
    match = ids_a.unsqueeze(-1) == ids_b.unsqueeze(-2)  # [..., k_a, k_b]
    p_b_at_a = (match * p_b.unsqueeze(-2)).sum(-1)  # q of each token of list a (0 if absent from b)
    return torch.minimum(p_a, p_b_at_a).sum(-1).clamp(0.0, 1.0)


def acceptance_rate_vs_dense_topk(
    dense_logprobs: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """`acceptance_rate_topk` of a rollout's top-k lists against the dense distribution's own top-k (k = the
    rollout's): dense_logprobs [..., V] full-vocabulary log-probs, topk_* [..., k]."""
    d_lp, d_ids = dense_logprobs.topk(topk_ids.shape[-1], dim=-1)
    return acceptance_rate_topk(d_ids, d_lp, topk_ids, topk_logprobs)


@dataclass
class BinStat:
    start: int  # first position of the bin (inclusive)
    end: int  # last position of the bin (exclusive)
    count: int  # tokens in the bin
    tail: float | None  # q-quantile of alpha (None for an empty bin)
    mean: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def tail_by_bin(
    alpha: torch.Tensor | np.ndarray | list,
    positions: torch.Tensor | np.ndarray | list,
    bin_tokens: int = 2048,
    q: float = 0.05,
    num_bins: int | None = None,
) -> list[BinStat]:
    """Group tokens by absolute position into bins and report each bin's q-quantile (numpy's linear rule).

    Bins run from 0 to the last occupied one (or `num_bins`); empty bins are reported with count 0.
    """
    a = _as_numpy(alpha).reshape(-1).astype(np.float64)
    pos = _as_numpy(positions).reshape(-1).astype(np.int64)
    if a.shape != pos.shape:
        raise ValueError(f"alpha ({a.size} values) and positions ({pos.size} values) differ in size")
    if bin_tokens < 1:
        raise ValueError(f"bin_tokens must be >= 1, got {bin_tokens}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {q}")
    if (pos < 0).any():
        raise ValueError("positions must be >= 0")
    keep = ~np.isnan(a)
    a, pos = a[keep], pos[keep]
    bins = pos // bin_tokens
    n = num_bins if num_bins is not None else (int(bins.max()) + 1 if bins.size else 0)
    stats = []
    for i in range(n):
        values = a[bins == i]
        tail = float(np.percentile(values, 100.0 * q)) if values.size else None
        mean = float(values.mean()) if values.size else None
        stats.append(BinStat(i * bin_tokens, (i + 1) * bin_tokens, int(values.size), tail, mean))
    return stats


def min_tail(stats: list[BinStat]) -> float | None:
    """Lowest tail over non-empty bins (the statistic compared with tau)."""
    tails = [s.tail for s in stats if s.tail is not None]
    return min(tails) if tails else None


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)
