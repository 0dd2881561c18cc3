"""Page selection for one decode step: score every page, keep sink and local pages, fill the budget by top score.

Selection is per (request, KV head). With GQA the query heads of a group share one page list:
- centroid scorer: the page centroid dotted with the mean query of the group (the paper's choice); centroid-bf16
  rounds the centroid (float32 sum / count, rounded to nearest) to bf16 first, so a bf16 copy of it scores the same;
- quest scorer: Quest's per-channel upper bound sum_d max(q_d * min_d, q_d * max_d), maximised over the group's
  heads so that the list covers every head of the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow_sgl.attention.pages import PageSummaries
from sparrow_sgl.config import CENTROID_SCORERS, SparsityConfig


@dataclass
class Selection:
    pages: torch.Tensor  # [batch, kv_heads, k] logical page indices into the block table, ascending, padded
    valid: torch.Tensor  # [batch, kv_heads, k] bool: which entries of `pages` are attended
    n_pages: torch.Tensor  # [batch] pages holding the request's tokens

    def attended_tokens(self, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
        """Tokens attended per (request, KV head): selected pages, the partial last page counted by its fill."""
        page_tokens = (seq_lens[:, None, None] - self.pages * page_size).clamp(0, page_size)
        return (page_tokens * self.valid).sum(-1)


def budget_pages_tensor(
    budget: int | None | list | torch.Tensor, n_pages: torch.Tensor, page_size: int
) -> torch.Tensor:
    """Per-request page budget [batch]; None (overall or per request) means every page."""
    if budget is None:
        return n_pages.clone()
    if isinstance(budget, int):
        return torch.clamp(n_pages, max=budget // page_size)
    if isinstance(budget, torch.Tensor):
        pages = budget.to(device=n_pages.device, dtype=torch.long) // page_size
        return torch.minimum(n_pages, torch.where(pages < 0, n_pages, pages))  # negative budget = dense
    if len(budget) != n_pages.shape[0]:
        raise ValueError(f"got {len(budget)} budgets for a batch of {n_pages.shape[0]}")
    limits = [n if b is None else min(n, int(b) // page_size) for n, b in zip(n_pages.tolist(), budget)]
    return torch.tensor(limits, dtype=torch.long, device=n_pages.device)


def score_pages(
    q: torch.Tensor, summaries: PageSummaries, block_table: torch.Tensor, cfg: SparsityConfig
) -> torch.Tensor:
    """Scores [batch, kv_heads, max_pages] of every block-table entry for queries q [batch, q_heads, head_dim]."""
    batch, q_heads, head_dim = q.shape
    kv_heads = summaries.key_sum.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    qg = q.float().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    pages = block_table.long().clamp(min=0)
    if cfg.scorer in CENTROID_SCORERS:
        centroids = summaries.centroid(pages)  # [batch, max_pages, kv_heads, head_dim]
        if cfg.bf16_centroids:
            centroids = centroids.to(torch.bfloat16).float()
        return torch.einsum("bhd,bphd->bhp", qg.mean(2), centroids)
    if not summaries.has_minmax:
        raise ValueError("the quest scorer needs page summaries with key_min/key_max (allocated with minmax=True)")
    kmin, kmax = summaries.key_min[pages], summaries.key_max[pages]
    kmin, kmax = kmin.nan_to_num(posinf=0.0), kmax.nan_to_num(neginf=0.0)  # empty pages are masked later
    upper = torch.maximum(
        torch.einsum("bhgd,bphd->bhgpd", qg, kmin), torch.einsum("bhgd,bphd->bhgpd", qg, kmax)
    ).sum(-1)
    return upper.amax(2)


def select_pages(
    q: torch.Tensor,
    summaries: PageSummaries | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    budget: int | None | list | torch.Tensor,
    cfg: SparsityConfig,
) -> Selection:
    """Pick at most budget // page_size pages per (request, KV head), always including sink and local pages.

    Without summaries (or when every budget covers its sequence) every page is taken and the KV-head dim is 1.
    """
    batch, max_pages = block_table.shape
    seq_lens = seq_lens.to(block_table.device).long()
    n_pages = (seq_lens + cfg.page_size - 1) // cfg.page_size
    if int(n_pages.max()) > max_pages:
        raise ValueError(f"block table has {max_pages} columns but a sequence needs {int(n_pages.max())} pages")
    limit = budget_pages_tensor(budget, n_pages, cfg.page_size)
    k = max(int(limit.max()), 1)
    idx = torch.arange(max_pages, device=block_table.device)[None, :]
    if summaries is None or bool((limit >= n_pages).all()):
        kv_heads = summaries.key_sum.shape[1] if summaries is not None else 1
        scores = torch.zeros(batch, max_pages, device=block_table.device)[:, None, :].expand(batch, kv_heads, -1)
    else:
        scores = score_pages(q, summaries, block_table, cfg)
    kv_heads = scores.shape[1]
    forced = (idx < cfg.sink_pages) | (idx >= n_pages[:, None] - cfg.local_pages)
    exists = idx < n_pages[:, None]
    scores = scores.masked_fill(forced[:, None, :], float("inf")).masked_fill(~exists[:, None, :], float("-inf"))
    top = scores.topk(min(k, max_pages), dim=-1).indices  # [batch, kv_heads, k]
    rank = torch.arange(top.shape[-1], device=top.device)
    valid = (rank[None, None, :] < limit[:, None, None]).expand_as(top)
    top = torch.where(valid, top, max_pages)  # padding sorts last
    pages, order = top.sort(dim=-1)
    valid = valid.gather(-1, order)
    pages = torch.where(valid, pages, 0)
    return Selection(pages=pages, valid=valid, n_pages=n_pages)
