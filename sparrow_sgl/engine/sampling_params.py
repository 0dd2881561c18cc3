"""Per-request sampling settings."""

from __future__ import annotations

from dataclasses import dataclass

from sparrow_sgl.config import ConfigError

MAX_LOGPROBS_TOPK = 20


@dataclass(slots=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off.

    seed: None = derived from `EngineConfig.seed` and a per-engine call counter; an int makes every sample
        reproducible (sample i of prompt j gets its own generator seeded from (seed, j, i)).
    stop_token_ids: extra ids that end a response (the stop token is kept in the output); EOS ends it too unless
        ignore_eos. logprobs_topk: also return the k most likely ids and log-probs per token (k <= 20).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    n: int = 1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs_topk: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if not (0 <= self.logprobs_topk <= MAX_LOGPROBS_TOPK):
            raise ConfigError(f"logprobs_topk must lie in [0, {MAX_LOGPROBS_TOPK}], got {self.logprobs_topk}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
