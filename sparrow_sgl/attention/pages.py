"""Per-page key summaries (centroid and Quest min/max), kept up to date as tokens are appended.

Summaries live beside the paged KV cache, indexed by physical page id, so a decode step scores pages without
rescanning the keys: appending a token touches only its own page's running sum, count, min and max.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow_sgl.config import SparsityConfig


@dataclass
class PageSummaries:
    key_sum: torch.Tensor  # [num_pages, kv_heads, head_dim] float32 running sum of keys
    count: torch.Tensor  # [num_pages] int32 tokens written to the page
    key_min: torch.Tensor | None  # [num_pages, kv_heads, head_dim] float32, +inf where empty; None: centroid only
    key_max: torch.Tensor | None  # [num_pages, kv_heads, head_dim] float32, -inf where empty; None: centroid only

    @classmethod
    def allocate(
        cls, num_pages: int, kv_heads: int, head_dim: int, device: torch.device | str = "cpu", minmax: bool = True
    ):
        """minmax=False keeps no Quest min/max (a centroid-only cache: a third of the summary bytes)."""
        shape = (num_pages, kv_heads, head_dim)
        return cls(
            key_sum=torch.zeros(shape, dtype=torch.float32, device=device),
            count=torch.zeros(num_pages, dtype=torch.int32, device=device),
            key_min=torch.full(shape, float("inf"), dtype=torch.float32, device=device) if minmax else None,
            key_max=torch.full(shape, float("-inf"), dtype=torch.float32, device=device) if minmax else None,
        )

    @property
    def has_minmax(self) -> bool:
        return self.key_min is not None and self.key_max is not None

    @property
    def num_pages(self) -> int:
        return self.count.shape[0]

    def centroid(self, pages: torch.Tensor | None = None) -> torch.Tensor:
        """Mean key of the given pages (any index shape; all pages if None), [..., kv_heads, head_dim] float32.

        Empty pages give 0. Indexing before dividing keeps a decode step's cost independent of the pool size.
        """
        if pages is None:
            return self.key_sum / self.count.clamp(min=1).to(torch.float32)[:, None, None]
        counts = self.count[pages].clamp(min=1).to(torch.float32)
        return self.key_sum[pages] / counts[..., None, None]

    def reset(self, pages: torch.Tensor) -> None:
        self.key_sum[pages] = 0.0
        self.count[pages] = 0
        if self.has_minmax:
            self.key_min[pages] = float("inf")
            self.key_max[pages] = float("-inf")

    def append(self, pages: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor) -> None:
        """Add `keys` [N, kv_heads, head_dim] written at (`pages`[N], `offsets`[N]) to their pages' summaries.

        A key written at offset 0 starts its page afresh, so recycled pages need no separate clearing.
        Several keys may land in the same page in one call (prefill).
        """
        if keys.dim() != 3 or keys.shape[1:] != self.key_sum.shape[1:]:
            expected = f"[N, {self.key_sum.shape[1]}, {self.key_sum.shape[2]}]"
            raise ValueError(f"keys must be {expected}, got {tuple(keys.shape)}")
        pages = pages.to(device=self.count.device, dtype=torch.long)
        fresh = pages[offsets.to(pages.device) == 0]
        if fresh.numel():
            self.reset(fresh)
        keys = keys.to(self.key_sum.dtype)
        self.key_sum.index_add_(0, pages, keys)
        self.count.index_add_(0, pages, torch.ones_like(pages, dtype=torch.int32))
        if not self.has_minmax:
            return
        index = pages[:, None, None].expand_as(keys)
        self.key_min.scatter_reduce_(0, index, keys, reduce="amin")
        self.key_max.scatter_reduce_(0, index, keys, reduce="amax")

    def copy_page(self, src: int, dst: int) -> None:
        """Duplicate a page's summary (copy-on-write of a shared partial page)."""
        for t in (self.key_sum, self.count, self.key_min, self.key_max):
            if t is not None:
                t[dst] = t[src]

    @classmethod
    def from_cache(
        cls, k_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, cfg: SparsityConfig
    ) -> PageSummaries:
        """Summaries computed by scanning the cache: the reference the incremental updates must equal."""
        k_hnd = to_hnd(k_cache, cfg).to(torch.float32)
        num_pages, kv_heads, page_size, head_dim = k_hnd.shape
        filled = torch.zeros(num_pages, dtype=torch.long, device=k_cache.device)
        for b in range(block_table.shape[0]):
            n = int(seq_lens[b])
            n_pages = -(-n // page_size)
            pages = block_table[b, :n_pages].long()
            tokens = (n - torch.arange(n_pages, device=k_cache.device) * page_size).clamp(max=page_size)
            filled.scatter_reduce_(0, pages, tokens, reduce="amax")
        mask = (torch.arange(page_size, device=k_cache.device)[None, :] < filled[:, None])[:, None, :, None]
        summaries = cls.allocate(num_pages, kv_heads, head_dim, device=k_cache.device)
        summaries.key_sum = (k_hnd * mask).sum(2)
        summaries.count = filled.to(torch.int32)
        summaries.key_min = torch.where(mask, k_hnd, float("inf")).amin(2)
        summaries.key_max = torch.where(mask, k_hnd, float("-inf")).amax(2)
        return summaries


def to_hnd(cache: torch.Tensor, cfg: SparsityConfig) -> torch.Tensor:
    """View a paged cache as [pages, kv_heads, page_size, head_dim] whatever its layout (no copy)."""
    if cache.dim() != 4:
        raise ValueError(f"paged KV cache must be 4-D, got shape {tuple(cache.shape)}")
    if cfg.kv_layout == "NHD":
        if cache.shape[1] != cfg.page_size:
            raise ValueError(f"NHD cache {tuple(cache.shape)} does not have page_size {cfg.page_size} in dim 1")
        return cache.permute(0, 2, 1, 3)
    if cache.shape[2] != cfg.page_size:
        raise ValueError(f"HND cache {tuple(cache.shape)} does not have page_size {cfg.page_size} in dim 2")
    return cache
