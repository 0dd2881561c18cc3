"""Teacher-forced log-probs of given tokens: what `Engine.score` returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow_sgl.config import ConfigError


@dataclass
class ScoreResult:
    logprobs: torch.Tensor  # [T] float32: log-prob of each response token (temperature applied), CPU
    topk_ids: torch.Tensor | None = None  # [T, k] int64, sorted by log-prob (descending)
    topk_logprobs: torch.Tensor | None = None  # [T, k] float32
    full_logprobs: torch.Tensor | None = None  # [T, V] float32


@dataclass
class ScoreRequest:
    temperature: float = 1.0
    topk: int = 0
    return_full: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"score temperature must be > 0, got {self.temperature}")
        if self.topk < 0:
            raise ConfigError(f"topk must be >= 0, got {self.topk}")

    def rows(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(chosen [N], topk_ids [N,k] | None, topk_logprobs [N,k] | None, full [N,V] | None) for logits [N, V]."""
        logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        chosen = logp.gather(-1, targets[:, None].to(logp.device))[:, 0]
        top_vals, top_ids = logp.topk(self.topk, dim=-1) if self.topk else (None, None)
        return chosen, top_ids, top_vals, (logp if self.return_full else None)

    def result(self, parts: list[tuple[torch.Tensor, ...]], length: int, vocab: int) -> ScoreResult:
        """Concatenate per-chunk `rows` outputs into one ScoreResult on CPU."""
        if not parts:
            k = self.topk
            return ScoreResult(
                torch.zeros(0),
                torch.zeros(0, k, dtype=torch.long) if k else None,
                torch.zeros(0, k) if k else None,
                torch.zeros(0, vocab) if self.return_full else None,
            )
        cat = [torch.cat([p[i] for p in parts]).cpu() if parts[0][i] is not None else None for i in range(4)]
        assert cat[0].shape[0] == length
        return ScoreResult(cat[0], cat[1], cat[2], cat[3])
