"""bench.centroid_policy: on the demo checkpoint, the "centroid-bf16" scorer leaves the sparse policy where the
float32 "centroid" scorer has it (the acceptance rate between the two sparse policies stays ~1)."""

from __future__ import annotations

from bench import centroid_policy


def test_bf16_centroids_barely_move_the_demo_policy():
    rows = centroid_policy.main(["--num-prompts", "4", "--samples", "2", "--budgets", "16,24"])
    assert [r["budget"] for r in rows] == [16, 24]
    for row in rows:
        assert row["tokens"] > 0 and 0 <= row["tokens_changed"] <= 1
        assert row["min_bf16_vs_fp32"] > 0.999  # the two sparse policies agree wherever they differ at all
        assert abs(row["tail_bf16_vs_dense"] - row["tail_fp32_vs_dense"]) < 1e-3

