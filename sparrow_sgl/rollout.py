"""Engine-neutral rollout record: what every engine (embedded, SGLang) returns and every trainer consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Rollout:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens
    logprobs: list[float]  # sampling log-prob of each generated token (temperature applied)
    finish_reason: str = "length"  # "stop" | "length" | "abort"
    topk_ids: list[list[int]] | None = None  # per generated token, k ids sorted by log-prob (descending)
    topk_logprobs: list[list[float]] | None = None
    prompt_index: int = 0  # which prompt of the batch this sample answers
    sample_index: int = 0  # which of the n samples of that prompt
    text: str | None = None
    meta: dict = field(default_factory=dict)  # e.g. schedule name, mean attended KV tokens per step

    @property
    def positions(self) -> list[int]:
        """Absolute position (index in prompt + response) of each generated token."""
        start = len(self.prompt_ids)
        return list(range(start, start + len(self.token_ids)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Rollout:
        return cls(**data)
