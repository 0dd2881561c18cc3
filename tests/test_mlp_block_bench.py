"""bench.mlp_block: refused without a GPU, by name; and, through Triton's interpreter on a tiny shape, every variant of
both spans runs and agrees with the engine's kernels (the CUDA-graph timing itself is stubbed: it needs a GPU; the
run on the H200 is in bench/results/NOTES.md)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import interpret_only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_without_a_gpu():
    from bench import mlp_block

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        mlp_block.main(["--models", "qwen3-4b"])


@interpret_only
def test_every_variant_runs_and_matches_the_chain(monkeypatch):
    from bench import mlp_block
    from sparrow_sgl.hardware import ModelShape

    monkeypatch.setattr(mlp_block, "graph_time_us", lambda fn, **_: fn() is not None and {"median_us": 1000.0})
    layers = mlp_block.make_layers(ModelShape("tiny", 2, 64, 4, 2, 16, 128, 100), 2, device="cpu")
    rows = mlp_block.measure("tiny", 3, layers, [1, 2], [(32, 32, 2)], bw=1000.0)
    assert [(r["span"], r["variant"]) for r in rows] == [
        ("mlp", "chain"), ("mlp", "chain-same"), ("mlp", "block-32x32x2-1x"), ("mlp", "block-32x32x2-2x"),
        ("after", "chain"), ("after", "block-32x32x2-1x"), ("after", "block-32x32x2-2x")]
    for row in rows:
        assert row["ms"] == 1.0 and row["us_per_layer"] == 500.0 and row["layers"] == 2
        assert row["max_abs_diff_vs_chain"] < 0.02, row  # bf16 outputs of magnitude ~0.1-1: a few ulps at most
    assert all("programs=" in r["plan"] for r in rows if r["variant"].startswith("block"))
