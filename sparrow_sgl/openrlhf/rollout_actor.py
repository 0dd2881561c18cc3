"""`SparrowRolloutActor`: what OpenRLHF's `RolloutRayActor` is (vllm_engine.py:33-206), served by sparrow-sgl.

Every method OpenRLHF calls on its engines is here, with its signature: `generate_responses` (the executor's own
loop: rewards, agents and the response dict stay OpenRLHF's), `generate` (returns a vLLM `RequestOutput`-like
object), `get_num_unfinished_requests`, `sleep` / `wake_up(tags)`, `init_process_group`, `update_weight(s)`,
`update_weight_cuda_ipc`, `reset_prefix_cache`, `pause_generation` / `resume_generation` (and, for DistillSparse,
`set_adapter`, `set_schedule` and the re-planner's `engine_call`). Each generated sample
also carries the engine's sparse statistics (`extra_logs`: `sparrow_kv_tokens_mean`, ...) and, with
`--sparrow.topk`, its top-k ids and log-probs (for the tails, tails.py). Every call is appended to
`<out_dir>/engine_<i>.jsonl`, so the order OpenRLHF drives the engines in can be checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch

from sparrow_sgl.openrlhf import batcher as batching
from sparrow_sgl.openrlhf.batcher import Batcher
from sparrow_sgl.openrlhf.flags import SGLangFlags, SparrowFlags

TOPK_KEY = "sparrow_topk"  # response-dict key carrying [ids, logprobs] per generated token (read by tails.py)


# -- vLLM's RequestOutput, as far as OpenRLHF reads it (agent.py:245-262) ------------------------------------------
@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[dict[int, Logprob]] | None
    index: int = 0


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    meta: dict = field(default_factory=dict)


def request_output(rollout, want_logprobs: bool) -> RequestOutput:
    logprobs = None
    if want_logprobs:
        logprobs = [{t: Logprob(lp)} for t, lp in zip(rollout.token_ids, rollout.logprobs)]
    finish = "length" if rollout.finish_reason == "length" else "stop"
    text = rollout.text or ""
    return RequestOutput(list(rollout.prompt_ids), [CompletionOutput(list(rollout.token_ids), text, finish, logprobs)],
                         meta=dict(rollout.meta))


def make_backend(model: str, sparrow: SparrowFlags, sgl: SGLangFlags, index: int, seed: int,
                 max_model_len: int | None, out_dir: str, gpu_memory_utilization: float | None = None):
    if sparrow.engine == "embedded":
        from sparrow_sgl.openrlhf.embedded_backend import EmbeddedBackend

        return EmbeddedBackend(model, seed=seed, max_model_len=max_model_len,
                               gpu_memory_utilization=gpu_memory_utilization)
    from sparrow_sgl.openrlhf.sglang_backend import SGLangBackend

    return SGLangBackend(model, sparrow, sgl, index=index, seed=seed, max_model_len=max_model_len, out_dir=out_dir)


@ray.remote
class SparrowRolloutActor:
    def __init__(self, *, index: int, model: str, sparrow: dict, sglang: dict, seed: int,
                 max_model_len: int | None, out_dir: str, agent_func_path: str | None = None,
                 remote_rm_url=None, enable_sleep: bool = False, schedule: dict | None = None,
                 gpu_memory_utilization: float | None = None, batch_samples: tuple[int, int] = (0, 0)) -> None:
        from sparrow_sgl.openrlhf import shims
        from sparrow_sgl.openrlhf.flags import from_dicts

        # The worker patches reach this process through Ray's worker_process_setup_hook (train_ppo_ray); an actor
        # started without that hook needs only the import shims for OpenRLHF's executor (the other patches are the
        # trainer's and the experience maker's).
        shims.install()
        self.index = index
        self.sparrow, self.sgl = from_dicts(sparrow, sglang)
        self.events = Path(out_dir) / f"engine_{index}.jsonl"
        self.events.parent.mkdir(parents=True, exist_ok=True)
        self.executor = _executor(agent_func_path, remote_rm_url)
        self.backend = make_backend(model, self.sparrow, self.sgl, index, seed, max_model_len, out_dir,
                                    gpu_memory_utilization)
        self.schedule = self.backend.resolve_schedule(schedule or self.sparrow.schedule)  # a dict: resumed guard
        fewest, most = batch_samples  # a step's samples start as one batch (batcher.py)
        self.batcher = Batcher(self._run_batch, expect=most, expect_min=fewest if most else 0)
        self.asleep: set[str] = set()
        self.group = None
        self.ipc = None  # the CUDA-IPC sync's staging (ipc_sync.py), made on first use
        self._log("init", engine=self.backend.name, schedule=self.schedule.describe(), pid=os.getpid())

    # -- generation ---------------------------------------------------------------------------------------------
    async def generate_responses(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples=1,
                                 images=None):
        """OpenRLHF's own executor per sample (vllm_engine.py:183-206), plus the sparse extras of each sample."""
        self._log("generate_responses", num_samples=num_samples)

        async def one():
            extras: dict = {}
            batching.sample_extras.set(extras)
            out = await self.executor.execute(prompt=prompt, label=label, sampling_params=sampling_params,
                                              max_length=max_length, hf_tokenizer=hf_tokenizer, llm_engine=self,
                                              images=images)
            out["extra_logs"] = {**(out.get("extra_logs") or {}), **extras.get("logs", {})}
            if TOPK_KEY in extras:
                out[TOPK_KEY] = extras[TOPK_KEY]
            return out

        return await asyncio.gather(*[asyncio.create_task(one()) for _ in range(num_samples)])

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        if multi_modal_data:
            raise NotImplementedError("sparrow-sgl rollout engines are text-only")
        if self.asleep:
            raise RuntimeError(f"engine {self.index} is asleep ({sorted(self.asleep)}): wake_up() first")
        key = _params_key(sampling_params)
        rollout = await self.batcher.submit(list(prompt_token_ids), sampling_params, key)
        extras = batching.sample_extras.get()
        if extras is not None:
            extras["logs"] = _meta_logs(rollout.meta)
            if rollout.topk_ids is not None:
                extras[TOPK_KEY] = [rollout.topk_ids, rollout.topk_logprobs]
        return request_output(rollout, sampling_params.logprobs is not None)

    def _run_batch(self, prompts: list[list[int]], params) -> list:
        rollouts = self.backend.generate(prompts, params, self.schedule, self.sparrow.topk)
        for r in rollouts:  # logged per step as sparrow_batch_samples: one batch a step shows its whole size
            r.meta["batch_samples"] = len(prompts)
        return rollouts

    def get_num_unfinished_requests(self) -> int:
        return self.batcher.num_unfinished

    # -- memory ---------------------------------------------------------------------------------------------------
    async def sleep(self, level=1):
        """Between rollouts only (OpenRLHF sleeps its engines after generating): a running request is an error."""
        self._log("sleep", level=level)
        async with self.batcher.lock:
            if self.batcher.num_unfinished:
                raise RuntimeError(f"engine {self.index}: sleep() with {self.batcher.num_unfinished} requests "
                                   "unfinished; OpenRLHF sleeps engines only between rollouts")
            await asyncio.to_thread(self.backend.release_memory, ["weights", "kv_cache"])
        self.asleep = {"weights", "kv_cache"}

    async def wake_up(self, tags=None):
        """OpenRLHF wakes the weights for a sync, then everything before the next rollout: like vLLM's wake_up, a
        part already awake is left alone (an SGLang server refuses to resume memory it has not released)."""
        tags = list(tags) if tags is not None else ["weights", "kv_cache"]
        self._log("wake_up", tags=tags)
        asleep = [tag for tag in tags if tag in self.asleep]
        if asleep:
            async with self.batcher.lock:
                await asyncio.to_thread(self.backend.resume_memory, asleep)
        self.asleep -= set(tags)

    async def reset_prefix_cache(self):
        self._log("reset_prefix_cache")
        async with self.batcher.lock:
            await asyncio.to_thread(self.backend.flush_cache)

    async def pause_generation(self):
        """vLLM's mode="keep": no new batch starts; the running one finishes first (its requests complete)."""
        self._log("pause_generation")
        self.batcher.gate.clear()
        async with self.batcher.lock:
            pass

    async def resume_generation(self):
        self._log("resume_generation")
        self.batcher.gate.set()

    # -- weights --------------------------------------------------------------------------------------------------
    async def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend,
                                 use_ray=False):
        from sparrow_sgl.openrlhf import weight_sync

        if use_ray:
            raise ValueError("--vllm.sync_with_ray is not supported by sparrow-sgl engines")
        self._log("init_process_group", rank=rank_offset, world_size=world_size, backend=backend)
        self.group = await asyncio.to_thread(
            self.backend.init_weights_group if hasattr(self.backend, "init_weights_group") else weight_sync.init_group,
            master_address, master_port, rank_offset, world_size, group_name, backend, self.sparrow.sync_timeout,
        )

    async def update_weights(self, specs: list[dict], group_name: str, flush_cache: bool = True) -> dict:
        """One sync: receive every tensor (in `specs` order), then apply them all; returns the greedy canary."""
        from sparrow_sgl.openrlhf.weight_sync import TensorSpec, receive

        specs = [TensorSpec(**s) for s in specs]
        start = time.perf_counter()
        async with self.batcher.lock:
            if hasattr(self.backend, "update_weights_from_group"):
                await asyncio.to_thread(self.backend.update_weights_from_group, specs, group_name)
            else:
                named = await asyncio.to_thread(receive, self.group, specs, self.backend.device)
                await asyncio.to_thread(self.backend.apply_weights, named)
            if flush_cache:
                await asyncio.to_thread(self.backend.flush_cache)
            canary = await self._canary()
        self._log("update_weights", tensors=len(specs), seconds=round(time.perf_counter() - start, 3),
                  canary=canary)
        return canary

    async def update_weight(self, name, dtype, shape, empty_cache=False):
        """OpenRLHF's one-parameter RPC (used only if the trainer-side patch is off)."""
        spec = {"name": name, "dtype": str(dtype).removeprefix("torch."), "shape": tuple(shape)}
        await self.update_weights([spec], "", flush_cache=bool(empty_cache))

    async def update_weight_cuda_ipc(self, name, dtype, shape, ipc_handles, empty_cache=False):
        """Colocated GPU path (ppo_actor.py:439-466): copy the trainer's tensor out of its CUDA IPC handle and wait
        for the copy; the sync's last call (`empty_cache`) applies them all (ipc_sync.py)."""
        from sparrow_sgl.openrlhf.ipc_sync import open_ipc_tensor

        tensor = open_ipc_tensor(ipc_handles)
        applied = await self.receive_ipc_tensor(name, tensor, last=bool(empty_cache))
        self._log("update_weight_cuda_ipc", name=name, applied=applied)

    async def receive_ipc_tensor(self, name: str, tensor: torch.Tensor, last: bool) -> bool:
        """One tensor of a CUDA-IPC sync, already opened (the seam a CPU test drives: CUDA IPC itself needs CUDA)."""
        return await self._receive_ipc([(name, tensor)], last)

    async def update_weight_bucket_cuda_ipc(self, entries: list[dict], dtype: str, ipc_handles: dict,
                                            last: bool = False) -> bool:
        """sparrow's bucketed colocated sync (ipc_buckets.py): many parameters packed in one shared flat buffer."""
        from sparrow_sgl.openrlhf.ipc_sync import open_ipc_tensor

        applied = await self.receive_ipc_bucket(entries, open_ipc_tensor(ipc_handles), last, dtype)
        self._log("update_weight_bucket_cuda_ipc", tensors=len(entries), applied=applied)
        return applied

    async def receive_ipc_bucket(self, entries: list[dict], flat: torch.Tensor, last: bool,
                                 dtype: str | None = None) -> bool:
        """One bucket of a bucketed CUDA-IPC sync, its buffer already opened (the seam a CPU test drives)."""
        from sparrow_sgl.openrlhf.ipc_sync import bucket_views

        try:
            named = bucket_views(entries, flat, dtype)
        except BaseException:
            if self.ipc is not None:
                self.ipc.staged = {}  # fail closed: the earlier buckets of this sync are dropped too
            raise
        return await self._receive_ipc(named, last)

    async def _receive_ipc(self, named: list[tuple[str, torch.Tensor]], last: bool) -> bool:
        from sparrow_sgl.openrlhf.ipc_sync import IpcReceiver

        if self.ipc is None:
            if not hasattr(self.backend, "weight_shapes"):
                raise NotImplementedError(f"the CUDA-IPC weight sync needs --sparrow.engine embedded (this engine is "
                                          f"{self.backend.name}): set --vllm.sync_backend gloo or leave colocation")
            self.ipc = IpcReceiver(self.backend.apply_weights, self.backend.weight_shapes(), self.backend.device,
                                   self.backend.optional_weights())
        async with self.batcher.lock:
            applied = await asyncio.to_thread(self.ipc.receive_many, named, last)
            if applied:
                await asyncio.to_thread(self.backend.flush_cache)
        return applied

    async def _canary(self) -> dict | None:
        """Greedy canary, or None when off, while the weights sleep, or while the KV cache sleeps on an engine that
        needs it (colocated runs sync weights-only; the embedded engine then runs it in a scratch pool)."""
        kv_ok = "kv_cache" not in self.asleep or self.backend.name == "embedded"
        if not self.sparrow.canary_tokens or "weights" in self.asleep or not kv_ok:
            return None
        canary = await asyncio.to_thread(self.backend.canary, self.sparrow.canary_tokens)
        return canary.to_dict()

    async def canary(self) -> dict | None:
        async with self.batcher.lock:
            return await self._canary()

    # -- DistillSparse: the rollout-only LoRA, and the re-planner's measurements --------------------------------
    async def set_adapter(self, path: str | None) -> str | None:
        """Serve the weights + the peft LoRA at `path` (None: the weights alone); later weight syncs keep it merged."""
        async with self.batcher.lock:
            await asyncio.to_thread(self.backend.set_adapter, path)
            await asyncio.to_thread(self.backend.flush_cache)
        self._log("set_adapter", path=path)
        return path

    async def engine_call(self, method: str, args: tuple, kwargs: dict):
        """`generate` / `score` / `set_adapter` on the embedded engine itself (the re-planner's tail measurement)."""
        if method not in ("generate", "score", "set_adapter"):
            raise ValueError(f"engine_call: {method!r} is not a measurement call")
        engine = getattr(self.backend, "engine", None)
        if engine is None:
            raise NotImplementedError(f"engine_call needs --sparrow.engine embedded (this one is {self.backend.name})")
        async with self.batcher.lock:
            return await asyncio.to_thread(getattr(engine, method), *args, **kwargs)

    # -- schedule (TailGuard, DistillSparse re-plans) -----------------------------------------------------------
    def set_schedule(self, schedule: dict) -> str:
        self.schedule = self.backend.resolve_schedule(schedule)
        self._log("set_schedule", schedule=self.schedule.describe())
        return self.schedule.describe()

    def get_schedule(self) -> dict:
        return self.schedule.to_dict()

    def shutdown(self) -> None:
        self.backend.close()

    def _log(self, call: str, **data) -> None:
        with self.events.open("a") as f:
            f.write(json.dumps({"t": time.time(), "call": call, **data}) + "\n")


def _executor(agent_func_path, remote_rm_url):
    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    return _load_agent_executor(agent_func_path) if agent_func_path else SingleTurnAgentExecutor(remote_rm_url)


def _params_key(p) -> tuple:
    stop = tuple(getattr(p, "stop_token_ids", None) or ())
    return (p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs, getattr(p, "seed", None), stop)


def _meta_logs(meta: dict) -> dict:
    """Scalar sparse statistics of one sample, as OpenRLHF extra_logs (logged as train/<key>)."""
    out = {}
    for key in ("kv_tokens_mean", "decode_steps", "batch_samples", "graph_captures", "graph_capture_s", "prefill_s",
                "decode_ms_per_step"):
        value = meta.get(key)
        if isinstance(value, int | float):
            out[f"sparrow_{key}"] = float(value)
    return out
