"""Shared fixtures: tiny random Qwen3 models saved in HF format (built offline, once per session)."""

from __future__ import annotations

import os

import pytest
import torch

from sparrow_sgl.tiny import TinyModelSpec, save_tiny_model


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads thrash."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _private_gemm_choice_cache(tmp_path_factory):
    """GPU tests time GEMM choices: keep them out of the user's cache (engine/linear_table.py), subprocesses too."""
    from sparrow_sgl.engine.linear_table import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("gemm-cache") / "linear_choices.json")
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 4-layer Qwen3 (4 query heads, 2 KV heads, head_dim 16) with a byte-level BPE tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), TinyModelSpec())


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build (and cache) tiny models of other shapes: `tiny_model_factory(num_key_value_heads=1, ...)`."""
    cache = {}

    def make(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            spec = TinyModelSpec(**overrides)
            cache[key] = save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3-var"), spec)
        return cache[key]

    return make
