"""Does page selection stay identical with bf16 centroids instead of float32 key sums? (CPU, torch reference.)

Random keys (plain, and with a few large shared channels as real keys have), one selection per (request, KV head)
with the float32 sums and one with the sums rounded to bf16 centroids (the "centroid-bf16" scorer).
Prints JSON rows: the share of rows whose selected page set is identical, and the share of selected pages swapped.

    python -m bench.centroid_agreement
"""

from __future__ import annotations

import argparse
import json

import torch

from sparrow_sgl.attention.pages import PageSummaries
from sparrow_sgl.attention.select import select_pages
from sparrow_sgl.config import SparsityConfig


def summaries(key_sum: torch.Tensor, count: torch.Tensor) -> PageSummaries:
    unused = torch.zeros(1, *key_sum.shape[1:])
    return PageSummaries(key_sum=key_sum, count=count, key_min=unused, key_max=unused)


def agreement(keys: str, budget: int, batch: int = 4, kv_heads: int = 8, group: int = 4, pages: int = 2048,
              head_dim: int = 128, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(pages, kv_heads, 16, head_dim, generator=gen)
    if keys == "outliers":  # ~5% of channels carry a large per-head offset
        mask = torch.rand(1, 1, 1, head_dim, generator=gen) < 0.05
        k = k + 4 * torch.randn(1, kv_heads, 1, head_dim, generator=gen) * mask
    key_sum, count = k.sum(2), torch.full((pages,), 16, dtype=torch.int32)
    bf16 = (key_sum / 16).bfloat16().float() * 16  # the bf16 centroid, times an exact power of two
    table = torch.stack([torch.randperm(pages, generator=gen) for _ in range(batch)]).int()
    seq = torch.full((batch,), pages * 16)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen)
    cfg = SparsityConfig()
    a = select_pages(q, summaries(key_sum, count), table, seq, budget, cfg)
    b = select_pages(q, summaries(bf16, count), table, seq, budget, cfg)
    same_rows, swapped, total = 0, 0, 0
    for i in range(batch):
        for h in range(kv_heads):
            sa = set(a.pages[i, h][a.valid[i, h]].tolist())
            sb = set(b.pages[i, h][b.valid[i, h]].tolist())
            same_rows += sa == sb
            swapped += len(sa - sb)
            total += len(sa)
    return {"keys": keys, "context": pages * 16, "budget": budget,
            "rows_identical": round(same_rows / (batch * kv_heads), 3), "pages_swapped": round(swapped / total, 5)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="512,2048,8192", help="tokens per (request, KV head)")
    args = p.parse_args(argv)
    rows = [agreement(keys, int(b)) for keys in ("randn", "outliers") for b in args.budgets.split(",")]
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
