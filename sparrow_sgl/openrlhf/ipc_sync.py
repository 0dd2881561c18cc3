"""Engine side of OpenRLHF's colocated CUDA-IPC weight sync (ppo_actor.py:439-466), fail-closed like weight_sync.py.

OpenRLHF sends one `update_weight_cuda_ipc` call per parameter, each naming a clone the trainer frees once the call
returns, and marks the last parameter of a sync with `empty_cache=True` (`count == num_params`, ppo_actor.py:455);
sparrow's bucketed sync (ipc_buckets.py) sends many parameters packed in one flat buffer per call. So each call
copies its tensors out of the trainer's memory and waits for those copies on the device before it returns (what
vLLM's worker does with `torch.cuda.synchronize()`); the copies are staged, checked against the engine's parameter
names and shapes, and applied together only at the last call, if every parameter arrived. A failed call drops the
staged tensors: the engine keeps its previous weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sparrow_sgl.openrlhf.weight_sync import SyncError


def open_ipc_tensor(ipc_handles: dict) -> torch.Tensor:
    """The trainer's tensor rebuilt from the handle of this process's GPU (vllm_worker_wrap.py:50-60)."""
    from openrlhf.trainer.ray.utils import get_physical_gpu_id

    func, args = ipc_handles[get_physical_gpu_id()]
    args = list(args)
    args[6] = torch.cuda.current_device()  # the rebuilt tensor lives on this process's device
    return func(*args)


def bucket_views(entries: list[dict], flat: torch.Tensor, dtype: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """(name, view) of each parameter packed in a flat bucket (ipc_buckets.py), every entry checked against it."""
    if dtype is not None and str(flat.dtype) != dtype:
        raise SyncError(f"CUDA-IPC weight bucket: announced {dtype}, the shared buffer is {flat.dtype}; nothing of "
                        "this sync is applied")
    named = []
    for e in entries:
        name, shape, offset, numel = e["name"], tuple(e["shape"]), int(e["offset"]), int(e["numel"])
        if offset < 0 or numel != math.prod(shape) or offset + numel > flat.numel():
            raise SyncError(f"CUDA-IPC weight bucket: {name} (shape {shape}, elements {offset}..{offset + numel}) does "
                            f"not lie in the {flat.numel()}-element buffer; nothing of this sync is applied")
        named.append((name, flat[offset : offset + numel].view(shape)))
    return named


def wait_for_copy(tensor: torch.Tensor) -> None:
    """Block until the device finished the copy into `tensor` (so the source memory may be reused)."""
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()


class IpcReceiver:
    """Stages the tensors of one CUDA-IPC sync; `apply(named)` receives all of them at the sync's last call."""

    def __init__(self, apply: Callable[[list[tuple[str, torch.Tensor]]], None],
                 shapes: dict[str, tuple[int, ...]] | None, device: torch.device | None = None,
                 optional: set[str] = frozenset()) -> None:
        """shapes: the engine's parameter shapes (None: unchecked); device: where copies are staged (None: the
        source tensor's device); optional: names a full sync may leave out (a tied lm_head)."""
        self.apply, self.shapes, self.device, self.optional = apply, shapes, device, set(optional)
        self.staged: dict[str, torch.Tensor] = {}

    def receive(self, name: str, tensor: torch.Tensor, last: bool) -> bool:
        """Stage a copy of `tensor`; at the `last` call apply the whole sync. True when weights were applied."""
        return self.receive_many([(name, tensor)], last)

    def receive_many(self, named: list[tuple[str, torch.Tensor]], last: bool) -> bool:
        """Stage copies of every (name, tensor) of one call, one wait for all of them; at the `last` call apply the
        whole sync. True when weights were applied."""
        try:
            copies: dict[str, torch.Tensor] = {}
            for name, tensor in named:
                self._check(name, tuple(tensor.shape), copies)
                copies[name] = tensor.to(self.device or tensor.device, copy=True)
            for copy in list(copies.values())[-1:]:
                wait_for_copy(copy)  # one stream: the last copy done means all of them are
            self.staged.update(copies)
            if not last:
                return False
            self._check_complete()
            staged, self.staged = list(self.staged.items()), {}
            self.apply(staged)
            return True
        except BaseException:
            self.staged = {}
            raise

    def _check_complete(self) -> None:
        missing = sorted(set(self.shapes or ()) - set(self.staged) - self.optional)
        if missing:
            raise SyncError(f"CUDA-IPC sync: its last tensor arrived but {len(missing)} parameter(s) did not, e.g. "
                            f"{missing[:3]}; nothing of this sync is applied")

    def _check(self, name: str, shape: tuple[int, ...], this_call: dict[str, torch.Tensor]) -> None:
        if name in self.staged or name in this_call:
            raise SyncError(f"CUDA-IPC sync: {name} arrived twice before the sync's last tensor (the previous sync "
                            "did not finish); its staged tensors are dropped, the engine keeps its old weights")
        if self.shapes is None:
            return
        expected = self.shapes.get(name)
        if expected is None:
            raise SyncError(f"CUDA-IPC sync: the engine has no parameter {name!r} (a PEFT LoRA policy? OpenRLHF's "
                            "IPC path sends PEFT names as they are); nothing of this sync is applied")
        if shape != expected:
            raise SyncError(f"CUDA-IPC sync: {name} has shape {shape}, the engine's is {expected}; nothing of this "
                            "sync is applied")
