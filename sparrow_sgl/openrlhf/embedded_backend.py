"""The embedded engine (`sparrow_sgl.engine.Engine`) behind an OpenRLHF rollout actor: no SGLang needed.

Everything runs in the actor's process: generation in a worker thread (one batch at a time, see batcher.py), the
weights-update group joined by this process, weights applied in place between batches. Sleep (tag "kv_cache")
frees the KV pool and the decode CUDA graphs; the weights stay on the device under either tag (the engine's
fused weights are views a move would break), so tag "weights" frees nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sparrow_sgl.config import ConfigError, EngineConfig, Schedule
from sparrow_sgl.engine import Engine
from sparrow_sgl.engine import SamplingParams as EngineParams
from sparrow_sgl.rollout import Rollout

CANARY_PROMPT = list(range(10, 42))
MEMORY_TAGS = ("weights", "kv_cache")  # vLLM's and SGLang's sleep / wake-up tags


@dataclass
class Canary:
    prompt: list[int]
    token_ids: list[int]
    logprobs: list[float]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "token_ids": self.token_ids, "logprobs": self.logprobs}


def engine_params(params, topk: int) -> EngineParams:
    """vLLM-style SamplingParams (what OpenRLHF sends) -> the engine's; top_k -1 means off in vLLM, 0 here."""
    stop = tuple(getattr(params, "stop_token_ids", None) or ())
    return EngineParams(
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=max(int(params.top_k), 0),
        max_new_tokens=int(params.max_tokens),
        n=1,
        seed=getattr(params, "seed", None),
        stop_token_ids=stop,
        logprobs_topk=topk,
    )


class EmbeddedBackend:
    name = "embedded"

    def __init__(self, model: str, seed: int, max_model_len: int | None, device: str | None = None,
                 dtype: str = "auto", page_size: int = 16, gpu_memory_utilization: float | None = None,
                 num_kv_pages: int | None = None) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = Engine(
            EngineConfig(model=model, device=device, dtype=dtype, seed=seed, max_model_len=max_model_len,
                         page_size=page_size, gpu_memory_utilization=gpu_memory_utilization,
                         num_kv_pages=num_kv_pages)
        )
        self.tokenizer = self.engine.tokenizer
        self.device = torch.device(device)

    def resolve_schedule(self, spec: str | dict | Schedule) -> Schedule:
        if isinstance(spec, dict):
            spec = Schedule.from_dict(spec)
        return self.engine.resolve_schedule(spec)

    def generate(self, prompts: list[list[int]], params, schedule: Schedule, topk: int) -> list[Rollout]:
        """Rollouts in `prompts` order. OpenRLHF sends each sample of a prompt as a request of its own; identical
        prompts go to the engine as one prompt with n samples, so it prefills and stores the prompt once for all
        of them (copy-on-write pages): with 8 samples of 3-6K-token prompts, 8x less prefill. A seed stays the
        call's, as the engine defines it: the same batch with the same seed repeats itself."""
        base = engine_params(params, topk)
        where: dict[tuple[int, ...], list[int]] = {}  # prompt -> its positions in `prompts`
        for i, prompt in enumerate(prompts):
            where.setdefault(tuple(prompt), []).append(i)
        by_count: dict[int, list[tuple[int, ...]]] = {}  # n -> the prompts that come n times
        for prompt, positions in where.items():
            by_count.setdefault(len(positions), []).append(prompt)
        out: list[Rollout | None] = [None] * len(prompts)
        captures, capture_s = self.engine.runner.graph_captures()
        prefill_s = decode_s = decode_steps = 0
        for c, (n, unique) in enumerate(by_count.items()):
            seed = None if base.seed is None else (base.seed * 1_000_003 + c) % 2**63  # calls draw apart
            rollouts = self.engine.generate([list(p) for p in unique], dataclasses.replace(base, n=n, seed=seed),
                                            schedule, progress=False)  # prompt-major: prompt 0's n samples, ...
            times = self.engine.last_run
            prefill_s, decode_s, decode_steps = (prefill_s + times.prefill_s, decode_s + times.decode_s,
                                                 decode_steps + times.decode_steps)
            for j, prompt in enumerate(unique):
                for s, i in enumerate(where[prompt]):
                    out[i] = rollouts[j * n + s]
        after, after_s = self.engine.runner.graph_captures()
        step_ms = round(decode_s / decode_steps * 1e3, 4) if decode_steps else None
        for r in out:  # per call: prefill and decode wall, graphs (re-)captured after a colocated wake-up
            r.meta.update(graph_captures=after - captures, graph_capture_s=round(after_s - capture_s, 3),
                          prefill_s=round(prefill_s, 4), decode_s=round(decode_s, 4), decode_ms_per_step=step_ms)
        return out

    def apply_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.engine.update_weights(named)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.engine.model.hf_parameters().items()}

    def optional_weights(self) -> set[str]:
        """Names a full sync may leave out: a tied lm_head is the embedding, which HF models send once."""
        return {"lm_head.weight"} if self.engine.model.tie_word_embeddings else set()

    def canary(self, num_tokens: int) -> Canary:
        """Greedy canary; while the KV pool sleeps (colocated syncs wake the weights only) it runs in a scratch
        pool of the few pages it needs, released again afterwards."""
        params = EngineParams(temperature=0.0, max_new_tokens=num_tokens, ignore_eos=True)
        scratch = self.engine.kv_released
        if scratch:
            page = self.engine.config.page_size
            self.engine.resume_kv_cache(num_pages=-(-(len(CANARY_PROMPT) + num_tokens) // page))
        try:
            r = self.engine.generate([CANARY_PROMPT], params, "dense", progress=False)[0]
        finally:
            if scratch:
                self.engine.release_kv_cache()
        return Canary(list(CANARY_PROMPT), list(r.token_ids), [float(x) for x in r.logprobs])

    def set_adapter(self, path: str | None) -> None:
        self.engine.set_adapter(path)

    def flush_cache(self) -> None:
        pass  # the embedded engine keeps no prefix cache across calls

    def release_memory(self, tags: list[str]) -> None:
        if "kv_cache" in _check_tags(tags):
            self.engine.release_kv_cache()

    def resume_memory(self, tags: list[str]) -> None:
        if "kv_cache" in _check_tags(tags):
            self.engine.resume_kv_cache()

    def close(self) -> None:
        pass


def _check_tags(tags: list[str]) -> list[str]:
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise ConfigError(f"sleep / wake_up tags must be among {MEMORY_TAGS}, got {unknown}")
    return list(tags)
