"""bench.mlp_block: refused without a GPU, by name (its GPU run is in bench/results/NOTES.md)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_without_a_gpu():
    from bench import mlp_block

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        mlp_block.main(["--models", "qwen3-4b"])
