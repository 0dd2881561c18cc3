"""`RolloutBatch`: a GRPO batch as padded tensors, one row per sampled sequence (prompt + response).

Every per-token tensor is aligned with `input_ids`: column j holds the value *of token j* (its rollout log-prob,
its advantage, ...), so the model's logits at column j - 1 score column j. `response_mask` marks the generated
tokens — the only ones any loss or per-token metric may count (the attention mask also covers the prompt).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch

from sparrow_sgl.rollout import Rollout


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [N, L] long, right-padded with pad_id
    attention_mask: torch.Tensor  # [N, L] bool: prompt and response tokens
    response_mask: torch.Tensor  # [N, L] bool: generated tokens only
    rollout_logprobs: torch.Tensor  # [N, L] float32: sampling log-prob of each generated token (0 elsewhere)
    advantages: torch.Tensor  # [N, L] float32: the sequence's advantage on its generated tokens (0 elsewhere)
    positions: torch.Tensor  # [N, L] long: absolute position of each token (0 = first prompt token)
    group_ids: torch.Tensor  # [N] long: index of the prompt a row answers (GRPO group)
    rewards: torch.Tensor  # [N] float32
    prompt_lens: torch.Tensor  # [N] long
    response_lens: torch.Tensor  # [N] long
    rollout_topk_ids: torch.Tensor | None = None  # [N, L, k] long: rollout top-k ids at generated tokens
    rollout_topk_logprobs: torch.Tensor | None = None  # [N, L, k] float32

    def __post_init__(self) -> None:
        n, length = self.input_ids.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            want = (n,) if f.name in ("group_ids", "rewards", "prompt_lens", "response_lens") else (n, length)
            if tuple(value.shape[: len(want)]) != want:
                raise ValueError(f"RolloutBatch.{f.name} has shape {tuple(value.shape)}, expected {want}[...]")
        if bool((self.response_mask & ~self.attention_mask).any()):
            raise ValueError("response_mask marks tokens outside the attention mask")

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_rollouts(
        cls,
        rollouts: Sequence[Rollout],
        rewards: Sequence[float] | torch.Tensor,
        advantages: Sequence[float] | torch.Tensor,
        pad_id: int = 0,
        with_topk: bool = False,
    ) -> RolloutBatch:
        """Pad rollouts into a batch; `advantages` are per sequence and broadcast over its generated tokens."""
        if not rollouts:
            raise ValueError("cannot build a RolloutBatch from zero rollouts")
        if len(rewards) != len(rollouts) or len(advantages) != len(rollouts):
            raise ValueError(f"{len(rollouts)} rollouts but {len(rewards)} rewards and {len(advantages)} advantages")
        n = len(rollouts)
        length = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
        input_ids = torch.full((n, length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(n, length, dtype=torch.bool)
        response_mask = torch.zeros(n, length, dtype=torch.bool)
        rollout_logprobs = torch.zeros(n, length)
        adv = torch.zeros(n, length)
        seq_adv = torch.as_tensor(advantages, dtype=torch.float32)
        k = _topk_width(rollouts) if with_topk else 0
        topk_ids = torch.zeros(n, length, k, dtype=torch.long) if k else None
        topk_lp = torch.full((n, length, k), float("-inf")) if k else None
        for i, r in enumerate(rollouts):
            p, t = len(r.prompt_ids), len(r.token_ids)
            if len(r.logprobs) != t:
                raise ValueError(f"rollout {i}: {t} tokens but {len(r.logprobs)} log-probs")
            input_ids[i, : p + t] = torch.tensor(list(r.prompt_ids) + list(r.token_ids), dtype=torch.long)
            attention_mask[i, : p + t] = True
            response_mask[i, p : p + t] = True
            rollout_logprobs[i, p : p + t] = torch.tensor(r.logprobs, dtype=torch.float32)
            adv[i, p : p + t] = seq_adv[i]
            if k and t:
                topk_ids[i, p : p + t] = torch.tensor(r.topk_ids, dtype=torch.long)[:, :k]
                topk_lp[i, p : p + t] = torch.tensor(r.topk_logprobs, dtype=torch.float32)[:, :k]
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            rollout_logprobs=rollout_logprobs,
            advantages=adv,
            positions=torch.arange(length).expand(n, length).clone(),
            group_ids=torch.tensor([r.prompt_index for r in rollouts], dtype=torch.long),
            rewards=torch.as_tensor(rewards, dtype=torch.float32),
            prompt_lens=torch.tensor([len(r.prompt_ids) for r in rollouts], dtype=torch.long),
            response_lens=torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.long),
            rollout_topk_ids=topk_ids,
            rollout_topk_logprobs=topk_lp,
        )

    # -- views ----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def prompt_ids(self, i: int) -> list[int]:
        return self.input_ids[i, : int(self.prompt_lens[i])].tolist()

    def response_ids(self, i: int) -> list[int]:
        p = int(self.prompt_lens[i])
        return self.input_ids[i, p : p + int(self.response_lens[i])].tolist()

    def select(self, rows: slice | torch.Tensor | Sequence[int], trim: bool = True) -> RolloutBatch:
        """A sub-batch of `rows`, with padding columns beyond its longest row dropped when `trim`."""
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        rows = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.attention_mask[rows].sum(-1).max()) if trim and len(rows) else self.input_ids.shape[1]
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif value.dim() == 1:
                out[f.name] = value[rows]
            else:
                out[f.name] = value[rows, :width]
        return replace(self, **out)

    def split(self, num_chunks: int) -> list[RolloutBatch]:
        """`num_chunks` consecutive sub-batches of equal size (mini-batches of one optimizer step each)."""
        if len(self) % num_chunks:
            raise ValueError(f"{len(self)} rows cannot be split into {num_chunks} equal mini-batches")
        size = len(self) // num_chunks
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(num_chunks)]

    def micro_batches(self, size: int) -> Iterator[RolloutBatch]:
        for start in range(0, len(self), size):
            yield self.select(slice(start, start + size))

    def to(self, device: torch.device | str) -> RolloutBatch:
        return replace(self, **{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


def _topk_width(rollouts: Sequence[Rollout]) -> int:
    widths = {len(row) for r in rollouts if r.topk_ids for row in r.topk_ids}
    if any(r.token_ids and not r.topk_ids for r in rollouts):
        raise ValueError("with_topk needs every rollout to carry top-k ids (set SamplingParams.logprobs_topk)")
    return min(widths) if widths else 0


def _move(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value
