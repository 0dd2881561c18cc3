"""Teacher-forced log-probs of given tokens: what `Engine.score` returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sparrow_sgl.config import ConfigError, EngineConfig, Schedule
from sparrow_sgl.engine.block_manager import BlockManager
from sparrow_sgl.engine.model_runner import ModelRunner
from sparrow_sgl.engine.sampling_params import SamplingParams
from sparrow_sgl.engine.scheduler import Scheduler
from sparrow_sgl.engine.sequence import Sequence, SequenceGroup


class Engine(Protocol):
    """What scoring uses of `engine.Engine` (a protocol, not an import: engine.py imports this module)."""

    config: EngineConfig
    hf_config: Any
    model: Any
    runner: ModelRunner
    block_manager: BlockManager
    device: torch.device

    def _new_sequence(self, prompt, params, max_new, prompt_index, sample_index=0, **kw) -> Sequence: ...

    def _run(self, groups: list[SequenceGroup], schedule: Schedule,
             choose: Callable[[list[Sequence], torch.Tensor], None], progress: bool, desc: str) -> None: ...

_SCORE_CHUNK_ELEMENTS = 2**26  # logits elements per scoring chunk (256 MiB of float32)


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


def score_sparse(
    engine: Engine, prompts, responses, schedule: Schedule, request: ScoreRequest, progress: bool
) -> list[ScoreResult]:
    """Dense prefill of each prompt, then the response fed token by token through the sparse decode step."""
    params = SamplingParams(temperature=request.temperature, logprobs_topk=0)
    groups, seqs = [], []
    for j, (prompt, response) in enumerate(zip(prompts, responses)):
        if len(response):
            seq = engine._new_sequence(prompt, params, len(response), j, forced_ids=[int(t) for t in response])
            seqs.append(seq)
            groups.append(SequenceGroup([seq]))

    def force(batch: list[Sequence], logits: torch.Tensor) -> None:
        targets = torch.tensor([s.forced_ids[len(s.output_ids)] for s in batch], device=logits.device)
        chosen, top_ids, top_vals, full = request.rows(logits, targets)
        chosen, targets = chosen.tolist(), targets.tolist()  # one device-to-host copy per step, not per row
        top_ids, top_vals = (top_ids.tolist(), top_vals.tolist()) if top_ids is not None else (None, None)
        full = full.cpu() if full is not None else None
        for i, seq in enumerate(batch):
            seq.output_ids.append(targets[i])
            seq.logprobs.append(chosen[i])
            if top_ids is not None:
                seq.topk_ids.append(top_ids[i])
                seq.topk_logprobs.append(top_vals[i])
            if full is not None:
                seq.full_logprobs.append(full[i])
            if len(seq.output_ids) == len(seq.forced_ids):
                seq.finish_reason = "length"

    engine._run(groups, schedule, force, progress, "score")
    by_prompt = {s.prompt_index: s for s in seqs}
    vocab = engine.hf_config.vocab_size
    results = []
    for j in range(len(prompts)):
        seq = by_prompt.get(j)
        if seq is None:
            results.append(request.result([], 0, vocab))
            continue
        parts = (
            torch.tensor(seq.logprobs, dtype=torch.float32),
            torch.tensor(seq.topk_ids, dtype=torch.long) if request.topk else None,
            torch.tensor(seq.topk_logprobs, dtype=torch.float32) if request.topk else None,
            torch.stack(seq.full_logprobs) if request.return_full else None,
        )
        results.append(request.result([parts], len(seq.output_ids), vocab))
    return results


def score_dense(engine: Engine, prompts, responses, request: ScoreRequest, progress: bool) -> list[ScoreResult]:
    """One dense prefill over prompt + response[:-1] per request; logits of the response positions in chunks."""
    vocab = engine.hf_config.vocab_size
    results: list[ScoreResult | None] = [None] * len(prompts)
    params = SamplingParams(max_new_tokens=1)
    groups = []
    for j, (prompt, response) in enumerate(zip(prompts, responses)):
        if not len(response):
            results[j] = request.result([], 0, vocab)
            continue
        tokens = list(prompt) + [int(t) for t in response[:-1]]
        seq = engine._new_sequence(tokens, params, 1, j, forced_ids=[int(t) for t in response])
        groups.append(SequenceGroup([seq]))
    scheduler = Scheduler(engine.block_manager, engine.config.max_num_seqs, engine.config.max_prefill_tokens)
    for group in groups:
        scheduler.add(group)
    chunk_rows = max(1, _SCORE_CHUNK_ELEMENTS // vocab)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(groups), desc="score (dense)", unit="seq", disable=not progress)
    sparsity = engine.config.sparsity()
    try:
        with torch.inference_mode():
            while not scheduler.is_finished():
                seqs = [g.leader for g in scheduler.schedule().groups]
                hidden = engine.runner.prefill(seqs, [s.prompt_ids for s in seqs], sparsity)
                start = 0
                for seq in seqs:
                    n_resp = len(seq.forced_ids)
                    first = start + len(seq.prompt_ids) - n_resp  # row predicting the first response token
                    targets = torch.tensor(seq.forced_ids, device=engine.device)
                    parts = []
                    for c in range(0, n_resp, chunk_rows):
                        rows = hidden[first + c : first + min(c + chunk_rows, n_resp)]
                        parts.append(request.rows(engine.model.compute_logits(rows), targets[c : c + chunk_rows]))
                    results[seq.prompt_index] = request.result(parts, n_resp, vocab)
                    start += len(seq.prompt_ids)
                    seq.finish_reason = "length"
                    scheduler.finish(seq)
                    bar.update(1)
    finally:
        bar.close()
        for seq in list(scheduler.running):
            scheduler.finish(seq)
    return results
