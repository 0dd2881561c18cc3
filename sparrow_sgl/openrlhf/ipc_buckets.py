"""Trainer side of the bucketed colocated CUDA-IPC weight sync: many parameters per call instead of one.

OpenRLHF's colocated sync (ppo_actor.py:439-466) makes, per parameter, a clone, an IPC handle, an all-gather of the
handles over the trainer ranks, one Ray call per engine and a barrier: ~4.5 ms each, 1.4-1.7 s for the 311 tensors
of a 1.7B model on an H200 (bench/results/NOTES.md, issue 20). Here consecutive parameters of one dtype are packed
into a flat buffer of at most `--sparrow.ipc_bucket_mb`, and each bucket makes that round once; the engine copies
each parameter out of the bucket (`update_weight_bucket_cuda_ipc`, ipc_sync.py) and applies nothing before the
sync's last bucket. The order, the ZeRO-3 gather, the VLM filter and the prefix-cache reset are OpenRLHF's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sparrow_sgl.openrlhf.weight_sync import wait


@dataclass(frozen=True, slots=True)
class BucketEntry:
    name: str
    shape: tuple[int, ...]
    offset: int  # elements into the bucket's flat buffer
    numel: int


@dataclass(slots=True)
class Bucket:
    dtype: torch.dtype
    entries: list[BucketEntry] = field(default_factory=list)
    params: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.entries[-1].offset + self.entries[-1].numel if self.entries else 0

    def wire(self) -> list[dict]:
        """The entries as the engine call takes them (plain types: they cross Ray)."""
        return [{"name": e.name, "shape": list(e.shape), "offset": e.offset, "numel": e.numel} for e in self.entries]


def plan_buckets(named: list[tuple[str, torch.nn.Parameter]], cap_bytes: int, zero3: bool) -> list[Bucket]:
    """Consecutive parameters of one dtype, up to `cap_bytes` a bucket (a larger parameter gets its own)."""
    if cap_bytes < 1:
        raise ValueError(f"bucket size must be >= 1 byte, got {cap_bytes}")
    buckets: list[Bucket] = []
    for name, param in named:
        shape = tuple(param.ds_shape if zero3 else param.shape)
        numel = math.prod(shape)
        last = buckets[-1] if buckets else None
        nbytes = (numel + (last.numel if last else 0)) * param.element_size()
        if last is None or last.dtype != param.dtype or (last.entries and nbytes > cap_bytes):
            last = Bucket(param.dtype)
            buckets.append(last)
        last.entries.append(BucketEntry(name, shape, last.numel, numel))
        last.params.append(param)
    return buckets


def pack(bucket: Bucket, device: torch.device) -> torch.Tensor:
    """A flat buffer holding the bucket's (gathered) parameters in order."""
    flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
    for entry, param in zip(bucket.entries, bucket.params):
        flat[entry.offset : entry.offset + entry.numel].copy_(param.data.reshape(-1))
    return flat


Sender = Callable[[list, Bucket, torch.Tensor, bool], list]


def send_over_cuda_ipc(engines: list, bucket: Bucket, flat: torch.Tensor, last: bool) -> list:
    """Every rank: share `flat` by CUDA IPC; rank 0 gathers the handles and calls each engine (ppo_actor.py:439-466)."""
    from openrlhf.trainer.ray.utils import get_physical_gpu_id
    from torch.multiprocessing.reductions import reduce_tensor

    handle = {get_physical_gpu_id(): reduce_tensor(flat)}
    handles = [handle]
    if dist.is_initialized():
        handles = [None] * dist.get_world_size()
        dist.all_gather_object(handles, handle)
    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    merged = {k: v for h in handles for k, v in h.items()}
    return [e.update_weight_bucket_cuda_ipc.remote(bucket.wire(), str(bucket.dtype), merged, last) for e in engines]


def broadcast_buckets(trainer, cap_mb: float, timeout_s: float, send: Sender | None = None) -> int:
    """The colocated sync of `trainer` (OpenRLHF's ActorPPOTrainer) in buckets; returns the number of buckets.
    send: how a packed bucket reaches the engines (None: `send_over_cuda_ipc`)."""
    import deepspeed

    send = send or send_over_cuda_ipc
    args = trainer.strategy.args
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    resets = []
    if rank0 and getattr(args.vllm, "enable_prefix_caching", False):
        resets = [e.reset_prefix_cache.remote() for e in trainer.vllm_engines]
    model = trainer.actor.model.module
    is_vlm = getattr(trainer.actor, "is_vlm", False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not is_vlm]
    zero3 = args.ds.zero_stage == 3
    buckets = plan_buckets(named, int(cap_mb * 2**20), zero3)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    _empty_cache()
    for i, bucket in enumerate(buckets):
        with deepspeed.zero.GatheredParameters(bucket.params, enabled=zero3):
            flat = pack(bucket, device)
        refs = send(trainer.vllm_engines, bucket, flat, i == len(buckets) - 1)
        wait(refs, timeout_s, f"CUDA-IPC weight bucket {i + 1}/{len(buckets)}")
        _barrier()  # every rank keeps its buffer until every engine copied out of it
        del flat
    wait(resets, timeout_s, "prefix-cache reset")
    _empty_cache()
    return len(buckets)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
