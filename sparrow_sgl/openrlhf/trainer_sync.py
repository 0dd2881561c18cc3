"""Trainer side of the weight sync, patched into OpenRLHF's `ActorPPOTrainer` (ppo_actor.py:113-151, 409-489).

`_init_vllm_sync_group`: rank 0 hosts SGLang's kind of weights-update group (weight_sync.py) instead of vLLM's
PyNccl one; `broadcast_to_vllm`: one `update_weights` call per engine with every tensor's name/dtype/shape, the
tensors broadcast in that order, each engine's greedy canary compared with the trainer's own log-probs of the same
tokens (with DistillSparse: θ + φ, which the engines serve; θ alone is sent). Any step past `--sparrow.sync_timeout`
raises `SyncError`. The colocated CUDA-IPC path is OpenRLHF's broadcast (ppo_actor.py:439-490) with many parameters
per call (ipc_buckets.py; `--sparrow.ipc_bucket_mb 0`: OpenRLHF's own, one call per parameter; engine side in
ipc_sync.py); once it returns, rank 0 runs the same canary check and writes the same sync record. The hook is on
the plain `ActorPPOTrainer` (the @ray.remote `PolicyModelActor.broadcast_to_vllm`, :646, calls it), patched in
every worker by patches.apply_worker.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sparrow_sgl.openrlhf import ipc_buckets
from sparrow_sgl.openrlhf.weight_sync import (
    GROUP_NAME,
    SyncError,
    TensorSpec,
    broadcast_watching,
    default_backend,
    hf_named_tensors,
    init_group,
    wait,
)


def patch() -> None:
    import openrlhf.trainer.ray.ppo_actor as ppo_actor

    cls = ppo_actor.ActorPPOTrainer
    if getattr(cls, "_sparrow_patched", False):
        return
    cls._openrlhf_broadcast_to_vllm = cls.broadcast_to_vllm
    cls._init_vllm_sync_group = init_sync_group
    cls.broadcast_to_vllm = broadcast_to_engines
    cls._sparrow_patched = True


def _sparrow(trainer):
    from sparrow_sgl.openrlhf.flags import from_hierarchical

    return from_hierarchical(trainer.strategy.args)[0]


def init_sync_group(self, backend: str) -> None:
    import ray

    sparrow = _sparrow(self)
    backend = backend if torch.cuda.is_available() else default_backend()
    address = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    tp = self.strategy.args.vllm.tensor_parallel_size
    world_size = len(self.vllm_engines) * tp + 1
    refs = [
        e.init_process_group.remote(address, port, i * tp + 1, world_size, GROUP_NAME, backend=backend, use_ray=False)
        for i, e in enumerate(self.vllm_engines)
    ]
    self._model_update_group = init_group(address, port, 0, world_size, GROUP_NAME, backend, sparrow.sync_timeout)
    wait(refs, sparrow.sync_timeout, "joining the weight-sync group")


def broadcast_to_engines(self) -> None:
    import deepspeed

    from sparrow_sgl.openrlhf import distill_hook

    distill = distill_hook.current(self)  # on a resumed run: created here, φ pushed to the engines before θ
    sparrow, args = _sparrow(self), self.strategy.args
    model = self.actor.model.module
    served = distill.served_model() if distill is not None else None
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    # every rank gathers (ZeRO-3), rank 0 talks to the engines
    gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=args.ds.zero_stage == 3)
    if self.use_cuda_ipc:
        start = time.perf_counter()
        buckets = None
        if sparrow.ipc_bucket_mb > 0:
            buckets = ipc_buckets.broadcast_buckets(self, sparrow.ipc_bucket_mb, sparrow.sync_timeout)
        else:
            self._openrlhf_broadcast_to_vllm()
        with gathered:
            if rank0:
                check_after_ipc(model, self.vllm_engines, sparrow, start, served, buckets)
        return None
    from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync

    resets = []
    if rank0 and args.vllm.enable_prefix_caching:  # OpenRLHF's order: cache resets go out first (ppo_actor.py:410)
        resets = [e.reset_prefix_cache.remote() for e in self.vllm_engines]
    with gathered:
        if rank0:
            push(model, self.vllm_engines, self._model_update_group, sparrow, flush=True, served=served)
    wait(resets, sparrow.sync_timeout, "prefix-cache reset")
    torch_dist_barrier_and_cuda_sync()


def push(model: torch.nn.Module, engines: list, group, sparrow, flush: bool = True,
         served: torch.nn.Module | None = None) -> list[dict | None]:
    """Rank 0: send the policy to every engine; check each engine's canary against `served` (what the engines
    serve: θ + the DistillSparse φ they merge on top) or, without it, against the policy itself."""
    start = time.perf_counter()
    named = list(hf_named_tensors(model))
    specs = [TensorSpec.of(n, t).__dict__ for n, t in named]
    refs = [e.update_weights.remote(specs, GROUP_NAME, flush) for e in engines]
    broadcast_watching(group, [t for _, t in named], refs, sparrow.sync_timeout, "weight sync")
    canaries = wait(refs, sparrow.sync_timeout, "weight sync")
    check_canaries(model, canaries, sparrow, len(named), start, served, "process_group")
    return canaries


def check_after_ipc(model: torch.nn.Module, engines: list, sparrow, start: float,
                    served: torch.nn.Module | None = None, buckets: int | None = None) -> list[dict | None]:
    """Rank 0, after the CUDA-IPC broadcast returned: every engine's canary against the trainer's. buckets: how many
    the bucketed sync sent (None: OpenRLHF's one call per parameter)."""
    seconds = round(time.perf_counter() - start, 3)  # the transfer alone, before the canaries
    canaries = wait([e.canary.remote() for e in engines], sparrow.sync_timeout, "canary after the CUDA-IPC sync")
    tensors = sum(1 for _ in model.parameters())
    check_canaries(model, canaries, sparrow, tensors, start, served, "cuda_ipc", buckets=buckets,
                   transfer_seconds=seconds)
    return canaries


def check_canaries(model: torch.nn.Module, canaries: list, sparrow, tensors: int, start: float,
                   served: torch.nn.Module | None, path: str, **extra) -> None:
    """Write the sync record (with `extra` fields); raise SyncError when an engine's canary differs from `served`
    (or the policy)."""
    record = {"path": path, "tensors": tensors, **extra, "seconds": round(time.perf_counter() - start, 3),
              "canary_max_abs_diff": None,
              "canary_reference": "policy+distill_lora" if served is not None else "policy"}
    diffs = [canary_diff(served if served is not None else model, c) for c in canaries if c is not None]
    if diffs:
        record["canary_max_abs_diff"] = max(diffs)
    _log_event(sparrow, "weight_sync", **record)
    if diffs and max(diffs) > sparrow.canary_atol:
        raise SyncError(
            f"after the {path} weight sync an engine's greedy canary log-probs differ from the trainer's by "
            f"{max(diffs):.4f} (> --sparrow.canary_atol {sparrow.canary_atol}): the engine does not serve the "
            "trained weights"
        )


@torch.no_grad()
def canary_diff(model: torch.nn.Module, canary: dict) -> float:
    """max |engine log-prob - trainer log-prob| over the canary's greedy tokens (temperature 1, plain softmax)."""
    prompt, tokens = canary["prompt"], canary["token_ids"]
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + tokens], device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    finally:
        model.train(was_training)
    logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    mine = logp.gather(-1, torch.tensor(tokens, device=device)[:, None]).squeeze(-1).cpu()
    return float((mine - torch.tensor(canary["logprobs"])).abs().max())


def _log_event(sparrow, kind: str, **data) -> None:
    if not sparrow.out_dir:
        return
    path = Path(sparrow.out_dir) / "trainer.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"t": time.time(), "event": kind, **data}) + "\n")


__all__ = ["SyncError", "patch", "push", "canary_diff", "check_after_ipc"]
