"""Trainer -> rollout-engine weight sync over a torch process group that SGLang can join.

The group is SGLang's weights-update group (`init_weights_update_group`: torch's process-group helper over a
`tcp://` rendezvous, PrefixStore(group_name)): the trainer's rank 0 is rank 0, engine i's ranks start at its
`rank_offset`. Gloo on CPU, NCCL on GPU. A sync is one `update_weights(names, dtypes, shapes)` call per engine
(SGLang's `update_weights_from_distributed` takes lists) plus one broadcast per tensor, in the same order on both
sides; an engine applies nothing until it holds every tensor, so a failed sync leaves it on the old weights. Every
step waits at most `timeout_s` and then raises `SyncError` (fail closed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

GROUP_NAME = "sparrow-weights"


class SyncError(RuntimeError):
    """A weight sync did not complete: the engines keep their previous weights and the run stops."""


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
               backend: str, timeout_s: float):
    """Join (or, rank 0, host) a process group outside the default one — the helper SGLang and vLLM use."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    url = f"tcp://{master_address}:{master_port}"
    try:
        store, rank, world_size = next(rendezvous(url, rank, world_size, timeout=timeout))
        store.set_timeout(timeout)
        store = PrefixStore(group_name, store)
        group, _ = _new_process_group_helper(
            world_size, rank, [], Backend(backend), store, group_name=group_name, backend_options=None, timeout=timeout
        )
    except (RuntimeError, TimeoutError, ValueError) as e:  # torch raises DistStoreError (a RuntimeError) on timeout
        raise SyncError(
            f"weight-sync group {group_name!r} ({url}, rank {rank}/{world_size}, {backend}) did not form within "
            f"{timeout_s:.0f} s: {e}"
        ) from e
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def destroy_group(group) -> None:
    if group is not None:
        dist.destroy_process_group(group)


@dataclass
class TensorSpec:
    name: str
    dtype: str  # "bfloat16", ...
    shape: tuple[int, ...]

    @staticmethod
    def of(name: str, t: torch.Tensor) -> TensorSpec:
        return TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape))

    def empty(self, device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=getattr(torch, self.dtype), device=device)


def broadcast(group, tensors: Iterable[torch.Tensor], timeout_s: float, what: str) -> None:
    """Rank 0 side: send each tensor to every engine rank (the engines post the matching receives)."""
    start = time.monotonic()
    for i, t in enumerate(tensors):
        try:
            dist.broadcast(t.contiguous(), src=0, group=group)
        except RuntimeError as e:
            waited = time.monotonic() - start
            raise SyncError(f"{what}: broadcast of tensor {i} failed after {waited:.1f} s: {e}") from e


def receive(group, specs: list[TensorSpec], device) -> list[tuple[str, torch.Tensor]]:
    """Engine side: every tensor of one sync, in order (nothing is applied here)."""
    out = []
    for spec in specs:
        t = spec.empty(device)
        dist.broadcast(t, src=0, group=group)
        out.append((spec.name, t))
    return out


def broadcast_watching(group, tensors: list[torch.Tensor], refs: list, timeout_s: float, what: str) -> None:
    """`broadcast` in a worker thread while watching the engines' calls: an engine that fails (it refused the
    update, its server died) stops the sync at once instead of leaving rank 0 blocked until the group timeout."""
    import threading

    import ray

    error: list[BaseException] = []

    def send():
        try:
            broadcast(group, tensors, timeout_s, what)
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            error.append(e)

    sender = threading.Thread(target=send, name="sparrow-weight-broadcast", daemon=True)
    sender.start()
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while sender.is_alive():
        if time.monotonic() > deadline:
            raise SyncError(f"{what}: the broadcast did not finish within {timeout_s:.0f} s (--sparrow.sync_timeout)")
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5) if pending else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                raise SyncError(f"{what}: an engine failed during the broadcast: {e}") from e
        sender.join(0.0 if pending else 0.5)
    if error:
        raise error[0]


def wait(refs: list, timeout_s: float, what: str) -> list:
    """ray.get with a deadline: a sync call that does not answer in time is an error, never a hang."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise SyncError(f"{what}: an engine did not answer within {timeout_s:.0f} s (--sparrow.sync_timeout)") from e
    except ray.exceptions.RayError as e:
        raise SyncError(f"{what}: an engine failed: {e}") from e


# -- what the trainer sends ----------------------------------------------------------------------------------------
def hf_named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under HF names; a PEFT LoRA policy is sent merged (W + scale * B @ A), since the engine
    serves plain weights (OpenRLHF itself would broadcast the PEFT names as they are)."""
    lora_layers = {name: m for name, m in model.named_modules() if _is_lora_layer(m)}
    if not lora_layers:
        yield from ((n, p.data) for n, p in model.named_parameters())
        return
    skip = set()
    for name, layer in lora_layers.items():
        base = layer.get_base_layer()
        for pname, _ in base.named_parameters(prefix=f"{name}.base_layer"):
            skip.add(pname)
        weight = base.weight.data
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        yield _hf_name(f"{name}.weight"), weight
        if getattr(base, "bias", None) is not None:
            yield _hf_name(f"{name}.bias"), base.bias.data
            skip.add(f"{name}.base_layer.bias")
    for n, p in model.named_parameters():
        if n in skip or ".lora_" in n or ".base_layer." in n:
            continue
        yield _hf_name(n), p.data


def _is_lora_layer(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_delta_weight") and hasattr(module, "get_base_layer")


def _hf_name(name: str) -> str:
    return name.removeprefix("base_model.model.")
