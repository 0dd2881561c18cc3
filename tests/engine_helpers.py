"""Shared helpers for the engine tests (not a test module)."""

from __future__ import annotations

import torch

from sparrow_sgl.config import EngineConfig
from sparrow_sgl.engine import Engine


def make_engine(model_dir, **overrides) -> Engine:
    kw = {"page_size": 4, "num_kv_pages": 512}
    kw.update(overrides)
    return Engine(EngineConfig(model=str(model_dir), **kw))


def hf_model(model_dir, dtype=torch.float32):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def random_prompts(lengths, vocab=500, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
