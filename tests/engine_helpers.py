"""Shared helpers for the engine tests (not a test module)."""

from __future__ import annotations

import os

import torch

from sparrow_sgl.config import EngineConfig
from sparrow_sgl.engine import Engine

# SPARROW_TEST_DEVICE=cuda runs the engine tests on a GPU (float32, so the CPU tolerances hold)
DEVICE = os.environ.get("SPARROW_TEST_DEVICE", "cpu")


def make_engine(model_dir, **overrides) -> Engine:
    kw = {"page_size": 4, "num_kv_pages": 512, "device": DEVICE, "dtype": "float32"}
    kw.update(overrides)
    return Engine(EngineConfig(model=str(model_dir), **kw))


def hf_model(model_dir, dtype=torch.float32):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def random_prompts(lengths, vocab=500, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
