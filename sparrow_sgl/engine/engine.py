"""The embedded rollout engine: `Engine(EngineConfig).generate(prompts, SamplingParams, schedule)` -> Rollouts.

One loop serves generation and scoring: the scheduler admits groups of samples whose worst-case KV pages fit,
prefill runs the group's prompt once (its samples share the pages), and every decode step attends to the pages
the schedule's budget allows at each request's current length. Scoring with a schedule runs the very same loop
with the response tokens forced, so it reproduces the sparse-decode log-probs of those tokens.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from sparrow_sgl.config import ConfigError, EngineConfig, Schedule, SparsityConfig
from sparrow_sgl.engine.block_manager import BlockManager
from sparrow_sgl.engine.kv_cache import GIB, KVCache, bytes_per_page, plan_num_pages
from sparrow_sgl.engine.loader import (
    eos_token_ids,
    load_model,
    load_tokenizer,
    load_weights,
    read_hf_config,
    resolve_dtype,
)
from sparrow_sgl.engine.lora import AdapterMerger
from sparrow_sgl.engine.model_runner import ModelRunner
from sparrow_sgl.engine.overlap import DecodeLaunch
from sparrow_sgl.engine.sampler import SampleOutput, Sampler, fused_enabled, unfiltered
from sparrow_sgl.engine.sampling_params import SamplingParams
from sparrow_sgl.engine.scheduler import Scheduler
from sparrow_sgl.engine.scoring import ScoreRequest, ScoreResult, score_dense, score_sparse
from sparrow_sgl.engine.sequence import Sequence, SequenceGroup
from sparrow_sgl.rollout import Rollout
from sparrow_sgl.schedule import resolve_schedule

_SEED_MIX = 1_000_003


def _mix_seed(*parts: int) -> int:
    seed = 0
    for part in parts:
        seed = (seed * _SEED_MIX + int(part)) % (2**63)
    return seed


def schedule_for_engine(config: EngineConfig, schedule: Schedule | str | None) -> Schedule:
    """The schedule an engine built from `config` would run (checked before any model is loaded). Named 'dense' /
    'fixed:N' take the config's sink/local/scorer settings; any schedule must use the config's page size."""
    named = schedule is None or (isinstance(schedule, str) and schedule.strip().split(":")[0] in ("dense", "fixed"))
    resolved = resolve_schedule(schedule, page_size=config.page_size)
    if named:
        resolved = dataclasses.replace(
            resolved, sink_pages=config.sink_pages, local_pages=config.local_pages, scorer=config.scorer
        )
    if resolved.page_size != config.page_size:
        raise ConfigError(
            f"schedule {resolved.name or ''!r} uses page_size {resolved.page_size} but the engine's KV pages "
            f"hold {config.page_size} tokens; build the engine with page_size={resolved.page_size}"
        )
    return resolved


def check_prompt(prompt: list[int], response_len: int, vocab_size: int, max_model_len: int, what: str) -> None:
    """A prompt the engine can run: non-empty, ids inside the vocabulary, prompt + response within max_model_len."""
    if not prompt:
        raise ConfigError(f"{what}: the prompt is empty (at least one token is needed)")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ConfigError(f"{what}: token ids must lie in [0, {vocab_size})")
    if len(prompt) + response_len > max_model_len:
        raise ConfigError(f"{what}: {len(prompt)} prompt tokens + {response_len} exceed max_model_len={max_model_len}")


@dataclasses.dataclass(slots=True)
class RunTimes:
    """Wall seconds of the engine loop's last run (a generate or sparse score call) by phase, and its steps. Each
    step ends with its outputs copied to the host, so the host clock includes the device work."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_steps: int = 0
    decode_steps: int = 0

    def add(self, prefill: bool, seconds: float) -> None:
        if prefill:
            self.prefill_s, self.prefill_steps = self.prefill_s + seconds, self.prefill_steps + 1
        else:
            self.decode_s, self.decode_steps = self.decode_s + seconds, self.decode_steps + 1


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.hf_config = read_hf_config(config.model)
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.model = load_model(config.model, self.hf_config, config.device, self.dtype)
        self.tokenizer = load_tokenizer(config.model)
        self.eos_token_ids = eos_token_ids(config.model, self.hf_config, self.tokenizer)
        self.max_model_len = config.max_model_len or self.hf_config.max_position_embeddings
        self.kv_cache = self._allocate_kv_cache()
        self.pool_pages = self.kv_cache.num_pages  # what a wake-up re-allocates (planned once, at start)
        self.block_manager = BlockManager(self.kv_cache.num_pages, config.page_size)
        self.runner = ModelRunner(self.model, self.kv_cache, self.device)
        self.sampler = Sampler()
        self.last_run = RunTimes()
        self._adapter = AdapterMerger(self.model.hf_parameters())
        self._next_seq_id = 0
        self._unseeded_calls = 0

    # -- setup ----------------------------------------------------------------------------------------------------
    def _allocate_kv_cache(self, num_pages: int | None = None) -> KVCache:
        cfg, hf = self.config, self.hf_config
        head_dim = self.model.model.layers[0].self_attn.head_dim
        shape = (hf.num_hidden_layers, hf.num_key_value_heads, cfg.page_size, head_dim)
        minmax = cfg.scorer == "quest"  # centroid engines keep no min/max summaries: more pages fit
        # a centroid-bf16 engine's GPU decoder keeps a bf16 centroid copy beside the pool: planned with it
        page_bytes = bytes_per_page(*shape, self.dtype, minmax=minmax, centroid_copy=cfg.sparsity().bf16_centroids)
        num_pages = num_pages or plan_num_pages(cfg, page_bytes)
        cache = KVCache(
            hf.num_hidden_layers, num_pages, hf.num_key_value_heads, cfg.page_size, head_dim, self.dtype, self.device,
            minmax=minmax,
        )
        cache.bind(self.model.attention_layers)
        print(
            f"sparrow engine: KV pool of {num_pages} pages x {cfg.page_size} tokens = {cache.num_tokens} tokens "
            f"({num_pages * page_bytes / GIB:.3f} GiB, {self.dtype} on {self.device})",
            file=sys.stderr,
        )
        return cache

    # -- sleep / wake-up (OpenRLHF's colocated mode: the trainer uses the memory between rollouts) -----------------
    @property
    def kv_released(self) -> bool:
        return self.kv_cache.num_pages == 0

    def release_kv_cache(self) -> None:
        """Free the KV pool and the decode CUDA graphs (their memory pool; they captured the pool's addresses).
        The weights stay. Only between calls: a request holding pages is an error."""
        if self.kv_released:
            return
        if self.block_manager.num_used:
            raise RuntimeError(f"cannot release the KV cache while requests hold {self.block_manager.num_used} pages")
        self.runner.rebind(None)
        self.kv_cache.release(self.model.attention_layers)
        self.block_manager = BlockManager(0, self.config.page_size)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_kv_cache(self, num_pages: int | None = None) -> None:
        """A fresh, empty pool (the old KV content is gone) of the size planned at start, or `num_pages`."""
        if not self.kv_released:
            return
        self.kv_cache = self._allocate_kv_cache(num_pages or self.pool_pages)
        self.block_manager = BlockManager(self.kv_cache.num_pages, self.config.page_size)
        self.runner.rebind(self.kv_cache)

    def _require_kv(self, what: str) -> None:
        if self.kv_released:
            raise RuntimeError(f"{what}: the KV cache is released (asleep); resume_kv_cache() first")

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    def resolve_schedule(self, schedule: Schedule | str | None) -> Schedule:
        """A Schedule for this engine. Named 'dense' / 'fixed:N' take the engine's sink/local/scorer settings."""
        return schedule_for_engine(self.config, schedule)

    def _sparsity(self, schedule: Schedule) -> SparsityConfig:
        self.kv_cache.check_schedule(schedule)
        return dataclasses.replace(schedule.sparsity(), kv_layout="HND")

    # -- public API -------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | None = None,
        schedule: Schedule | str | None = None,
        progress: bool = True,
    ) -> list[Rollout]:
        """len(prompts) * n rollouts in prompt-major order (all samples of prompt 0, then prompt 1, ...)."""
        self._require_kv("generate")
        params = params or SamplingParams()
        schedule = self.resolve_schedule(schedule)
        prompt_ids = self._encode(prompts)
        base_seed = params.seed
        if base_seed is None:
            base_seed = _mix_seed(self.config.seed, self._unseeded_calls)
            self._unseeded_calls += 1
        groups = []
        for j, ids in enumerate(prompt_ids):
            self._check_length(ids, 1, f"prompt {j + 1}")
            max_new = min(params.max_new_tokens, self.max_model_len - len(ids))
            seqs = []
            for i in range(params.n):
                generator = torch.Generator().manual_seed(_mix_seed(base_seed, j, i))
                seqs.append(self._new_sequence(ids, params, max_new, j, i, generator=generator))
            groups += self._split_group(seqs)
        self._run(groups, schedule, self._sample, progress, "generate")
        seqs = sorted((s for g in groups for s in g.seqs), key=lambda s: (s.prompt_index, s.sample_index))
        return [self._rollout(s, schedule) for s in seqs]

    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        sparse: Schedule | str | None = None,
        topk: int = 0,
        return_full: bool = False,
        temperature: float = 1.0,
        progress: bool = False,
    ) -> list[ScoreResult]:
        """Teacher-forced log-probs of each response given its prompt (results on CPU).

        sparse=None: dense, one prefill over prompt + response. sparse=schedule: dense prefill of the prompt, then
        the response tokens fed one by one through the sparse decode step, so the page selection (and the log-probs)
        are exactly those of a sparse rollout of the same tokens. Log-probs use logits / temperature (no top-k/p).
        """
        self._require_kv("score")
        if len(prompt_ids) != len(response_ids):
            raise ConfigError(f"score got {len(prompt_ids)} prompts but {len(response_ids)} responses")
        request = ScoreRequest(temperature=temperature, topk=topk, return_full=return_full)
        for j, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            self._check_length(list(p), len(r), f"request {j + 1}")
        if sparse is None:
            return score_dense(self, prompt_ids, response_ids, request, progress)
        return score_sparse(self, prompt_ids, response_ids, self.resolve_schedule(sparse), request, progress)

    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the base weights in place; the active adapter (if any) is merged again."""
        items = weights.items() if isinstance(weights, Mapping) else weights
        if self._adapter.active is not None:
            items = self._adapter.route_update(items)
        load_weights(self.model, items, where="update_weights")

    def set_adapter(self, path: str | Path | None) -> None:
        """Serve base + the peft LoRA adapter at `path` (None: the base weights, restored exactly)."""
        self._adapter.set(path)

    @property
    def adapter_path(self) -> str | None:
        return self._adapter.active.path if self._adapter.active is not None else None

    def pool_usage(self) -> dict:
        """Pages of the KV pool: total, in use now, and the peak of the last generate/score call."""
        bm = self.block_manager
        return {
            "pages": bm.num_pages,
            "used_pages": bm.num_used,
            "peak_used_pages": bm.peak_used,
            "page_size": bm.page_size,
        }

    # -- requests -----------------------------------------------------------------------------------------------------
    def _encode(self, prompts) -> list[list[int]]:
        if not isinstance(prompts, list | tuple):
            raise ConfigError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
        out = []
        for j, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ConfigError(f"{self.config.model} has no tokenizer: pass token ids instead of text")
                out.append(self.tokenizer.encode(prompt))
            elif isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
                out.append([int(t) for t in prompt])
            else:
                raise ConfigError(f"prompt {j + 1} is neither text nor a list of token ids: {type(prompt).__name__}")
        return out

    def _check_length(self, prompt: list[int], response_len: int, what: str) -> None:
        check_prompt(prompt, response_len, self.hf_config.vocab_size, self.max_model_len, what)

    def _new_sequence(self, prompt, params, max_new, prompt_index, sample_index=0, **kw) -> Sequence:
        self._next_seq_id += 1
        return Sequence(self._next_seq_id, list(prompt), params, max_new, prompt_index, sample_index, **kw)

    def _split_group(self, seqs: list[Sequence]) -> list[SequenceGroup]:
        """Samples of one prompt as few groups as the pool and max_num_seqs allow (each group prefills once)."""
        bm, size = self.block_manager, len(seqs)
        prompt_len, capacity = len(seqs[0].prompt_ids), seqs[0].kv_capacity
        while size > 1 and (
            bm.group_pages(prompt_len, size, capacity) > bm.num_pages or size > self.config.max_num_seqs
        ):
            size -= 1
        return [SequenceGroup(seqs[i : i + size]) for i in range(0, len(seqs), size)]

    def _rollout(self, seq: Sequence, schedule: Schedule) -> Rollout:
        k = seq.params.logprobs_topk
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True) if self.tokenizer else None
        return Rollout(
            prompt_ids=seq.prompt_ids,
            token_ids=seq.output_ids,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            topk_ids=seq.topk_ids if k else None,
            topk_logprobs=seq.topk_logprobs if k else None,
            prompt_index=seq.prompt_index,
            sample_index=seq.sample_index,
            text=text,
            meta={
                "schedule": schedule.name or "custom",
                "kv_tokens_mean": seq.kv_tokens_mean,
                "decode_steps": seq.decode_steps,
            },
        )

    # -- the loop -----------------------------------------------------------------------------------------------------
    def _run(
        self,
        groups: list[SequenceGroup],
        schedule: Schedule,
        choose: Callable[[list[Sequence], torch.Tensor], None],
        progress: bool,
        desc: str,
    ) -> None:
        """Run every group to completion; `choose(seqs, logits)` appends each sequence's next token. Generate's
        decode steps (`choose` is `_sample`) are launched and read as `DecodeLaunch`es, the next one launched
        before this one is read where it can be (`overlap.py`)."""
        from tqdm.auto import tqdm

        sparsity = self._sparsity(schedule)
        num_sparse = sum(1 for i in range(self.num_layers) if not sparsity.is_dense_layer(i))
        scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_prefill_tokens)
        for group in groups:
            scheduler.add(group)
        self.block_manager.reset_peak()
        self.last_run = times = RunTimes()
        bar = tqdm(total=sum(g.n for g in groups), desc=desc, unit="seq", disable=not progress, file=sys.stderr)
        tokens, start = 0, time.perf_counter()
        launched: DecodeLaunch | None = None  # a generate decode step on the device, not read yet
        try:
            with torch.inference_mode():
                mark = time.perf_counter()
                while not scheduler.is_finished():
                    prefill = False
                    if launched is not None:
                        after = launched
                        launched = self._launch(after.seqs, schedule, sparsity, num_sparse, after) \
                            if after.can_feed_next() else None
                        seqs = self._read(after)
                    else:
                        step = scheduler.schedule()
                        prefill, seqs = step.is_prefill, step.seqs
                        if prefill:
                            seqs, logits = self._prefill(step.groups, sparsity)
                            choose(seqs, logits)
                        elif choose == self._sample:
                            launched = self._launch(seqs, schedule, sparsity, num_sparse)
                            continue  # read (and timed) on the next turn
                        else:
                            choose(seqs, self._decode(seqs, schedule, sparsity, num_sparse))
                    now = time.perf_counter()
                    times.add(prefill, now - mark)
                    mark, tokens = now, tokens + len(seqs)
                    busy = set(launched.seqs) if launched is not None else set()
                    for seq in [s for s in scheduler.running if s.is_finished and s not in busy]:
                        scheduler.finish(seq)  # its pages stay until no launched step writes them
                        bar.update(1)
                    rate = tokens / max(now - start, 1e-9)
                    bar.set_postfix_str(f"{rate:.1f} tok/s, running {len(scheduler.running)}", refresh=False)
        finally:
            bar.close()
            if launched is not None and launched.pending is not None:
                launched.pending.event.synchronize()
            for seq in list(scheduler.running):  # an interrupted run must not leak pages
                scheduler.finish(seq)

    def _prefill(self, groups: list[SequenceGroup], sparsity: SparsityConfig) -> tuple[list[Sequence], torch.Tensor]:
        leaders = [g.leader for g in groups]
        hidden = self.runner.prefill(leaders, [s.prompt_ids for s in leaders], sparsity)
        last = torch.tensor([len(s.prompt_ids) for s in leaders], device=self.device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last])
        self.kv_cache.copy_pages([c[0] for g in groups for c in g.copies], [c[1] for g in groups for c in g.copies])
        seqs, rows = [], []
        for row, group in enumerate(groups):
            for seq in group.seqs:
                seq.num_cached = group.prompt_len
                seqs.append(seq)
                rows.append(row)
        return seqs, logits[rows]

    def _decode(self, seqs: list[Sequence], schedule: Schedule, sparsity: SparsityConfig, num_sparse: int):
        budgets = [schedule.budget_at(s.num_cached + 1) for s in seqs]
        logits, attended = self.runner.decode(seqs, budgets, sparsity, num_sparse, schedule=schedule)
        self._advance(seqs, attended.tolist())
        return logits

    @staticmethod
    def _advance(seqs: list[Sequence], attended: list[float]) -> None:
        """After a decode step: one more cached token per sequence, and the KV tokens it attended."""
        for seq, tokens in zip(seqs, attended):
            seq.num_cached += 1
            seq.attended_tokens_sum += tokens
            seq.decode_steps += 1

    def _launch(self, seqs: list[Sequence], schedule: Schedule, sparsity: SparsityConfig, num_sparse: int,
                after: DecodeLaunch | None = None) -> DecodeLaunch:
        """Generate's decode step of `seqs`: one CUDA graph replay that samples too (CUDA decoder, fused sampler, no
        top-k/top-p filtering), read later; elsewhere decoded and sampled apart, at once. after: the launched, unread
        step of the same sequences that this one follows."""
        if self.runner.gpu_decoder() is not None and fused_enabled() and unfiltered(seqs):
            k_max = max(s.params.logprobs_topk for s in seqs)
            rows = self.sampler.rows(seqs)
            pending = self.runner.launch_sample(seqs, sparsity, schedule, rows, k_max, after and after.pending)
            return DecodeLaunch(seqs, pending=pending, topk=k_max)
        fed = None if after is None else after.result()[0].token_ids
        ahead = 0 if after is None else 1
        budgets = [schedule.budget_at(s.num_cached + ahead + 1) for s in seqs]
        logits, attended = self.runner.decode(seqs, budgets, sparsity, num_sparse, schedule=schedule, token_ids=fed)
        return DecodeLaunch(seqs, ready=(self.sampler(logits, seqs), attended.tolist()))

    def _read(self, launched: DecodeLaunch) -> list[Sequence]:
        """Take a launched step's tokens into its sequences; rows of sequences that stopped before it (it was
        launched before their stop was read) are dropped. Returns the sequences that advanced."""
        out, attended = launched.result()
        rows = [i for i, seq in enumerate(launched.seqs) if not seq.is_finished]
        seqs = [launched.seqs[i] for i in rows]
        self._advance(seqs, [attended[i] for i in rows])
        self._take(seqs, out.subset(rows))
        return seqs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        self._take(seqs, self.sampler(logits, seqs))

    def _take(self, seqs: list[Sequence], out: SampleOutput) -> None:
        """Append each sequence's sampled token (and log-probs); mark those that stop or reach their length."""
        for i, seq in enumerate(seqs):
            token = out.token_ids[i]
            seq.output_ids.append(token)
            seq.logprobs.append(out.logprobs[i])
            if seq.params.logprobs_topk:
                seq.topk_ids.append(out.topk_ids[i])
                seq.topk_logprobs.append(out.topk_logprobs[i])
            if token in seq.params.stop_token_ids or (not seq.params.ignore_eos and token in self.eos_token_ids):
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.max_new_tokens:
                seq.finish_reason = "length"
