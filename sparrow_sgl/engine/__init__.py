"""Embedded rollout engine (nano-vllm style): Qwen3 model, paged KV cache, continuous batching, sparse decode."""

from sparrow_sgl.engine.engine import Engine
from sparrow_sgl.engine.sampling_params import SamplingParams
from sparrow_sgl.engine.scoring import ScoreResult

__all__ = ["Engine", "SamplingParams", "ScoreResult"]
