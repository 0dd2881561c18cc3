"""A request's state through the engine: prompt, generated tokens, their log-probs, KV pages and cached length."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparrow_sgl.engine.sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_new_tokens capped by the engine's max_model_len
    prompt_index: int = 0
    sample_index: int = 0
    generator: torch.Generator | None = None
    forced_ids: list[int] | None = None  # teacher forcing (scoring): the tokens to "generate"
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)
    full_logprobs: list[torch.Tensor] = field(default_factory=list)  # scoring with return_full
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    attended_tokens_sum: float = 0.0  # attended KV tokens per decode step, summed over steps
    decode_steps: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def kv_capacity(self) -> int:
        """Most tokens this sequence ever holds in the cache (the last generated token is never fed back)."""
        return len(self.prompt_ids) + self.max_new_tokens - 1

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def kv_tokens_mean(self) -> float:
        return self.attended_tokens_sum / self.decode_steps if self.decode_steps else 0.0


@dataclass(eq=False)
class SequenceGroup:
    """Samples of one prompt admitted together: the first one's prefill fills the prompt pages they all share."""

    seqs: list[Sequence]
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) pages to copy after the prefill

    @property
    def leader(self) -> Sequence:
        return self.seqs[0]

    @property
    def prompt_len(self) -> int:
        return len(self.leader.prompt_ids)

    @property
    def n(self) -> int:
        return len(self.seqs)

    @property
    def kv_capacity(self) -> int:
        return max(s.kv_capacity for s in self.seqs)
