"""bench.centroid_policy: on the demo checkpoint, bf16-rounded centroids leave the sparse policy where it was (the
acceptance rate between the two sparse policies stays ~1), and the rounding is undone after the pass."""

from __future__ import annotations

import torch

from bench import centroid_policy
from sparrow_sgl.attention.pages import PageSummaries


def test_bf16_centroids_barely_move_the_demo_policy():
    rows = centroid_policy.main(["--num-prompts", "4", "--samples", "2", "--budgets", "16,24"])
    assert [r["budget"] for r in rows] == [16, 24]
    for row in rows:
        assert row["tokens"] > 0 and 0 <= row["tokens_changed"] <= 1
        assert row["min_bf16_vs_fp32"] > 0.999  # the two sparse policies agree wherever they differ at all
        assert abs(row["tail_bf16_vs_dense"] - row["tail_fp32_vs_dense"]) < 1e-3


def test_rounding_is_scoped_to_the_context():
    summaries = PageSummaries.allocate(2, 1, 4)
    summaries.key_sum.fill_(1 / 3)
    summaries.count.fill_(1)
    exact = summaries.centroid()
    with centroid_policy.bf16_centroids():
        assert torch.equal(summaries.centroid(), exact.bfloat16().float())
    assert torch.equal(summaries.centroid(), exact) and not torch.equal(exact, exact.bfloat16().float())
