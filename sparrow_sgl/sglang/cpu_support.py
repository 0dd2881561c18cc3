"""Patches that let a stock SGLang 0.5.23 run on a CPU-only host (CI, laptops). Never applied when CUDA is present.

SGLang's CPU engine (`SGLANG_USE_CPU_ENGINE=1`) needs a CUDA build of `sgl_kernel`, so we run the generic device
path with `--device cpu`; two spots in it assume an accelerator:
- `layers/rotary_embedding/base.py` imports `vllm._custom_ops.rotary_embedding` unless its module flag `_is_cpu` is
  true; with the flag set it uses `forward_native` (pure torch).
- the LoRA layers and the torch LoRA backend pin host tensors (`pin_memory=True`, `.pin_memory()`), which raises
  without a driver; pinning only speeds up host-to-device copies, so on a CPU-only host it is dropped.

The scheduler runs in a spawned process, so patching the parent is not enough: `apply()` is called from the plugin
entry point, which SGLang runs in every process. Modules are patched right after they are imported (a meta-path
hook), so applying costs no eager import of SGLang internals.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import types
from collections.abc import Callable

ENV_SWITCH = "SPARROW_SGLANG_CPU_PATCHES"  # "1" force on, "0" force off, unset: on when CUDA is unavailable
_PIN_FACTORIES = ("tensor", "empty", "zeros", "ones", "full", "arange", "empty_like", "zeros_like", "ones_like")
_applied = False


def needed() -> bool:
    switch = os.environ.get(ENV_SWITCH)
    if switch in ("0", "1"):
        return switch == "1"
    import torch

    return not torch.cuda.is_available()


def apply() -> bool:
    """Install the CPU patches once per process when `needed()`; returns whether they are active."""
    global _applied
    if _applied:
        return True
    if not needed():
        return False
    import torch

    torch.Tensor.pin_memory = _pin_memory_noop  # only reached without CUDA: pinning is meaningless there
    _on_import("sglang.srt.layers.rotary_embedding.base", _use_native_rotary)
    _on_import("sglang.srt.lora.layers", _drop_pin_memory_kwarg)
    _on_import("sglang.srt.lora.backend.torch_backend", _drop_pin_memory_kwarg)
    _applied = True
    return True


def _pin_memory_noop(self, device=None):
    return self


def _use_native_rotary(module: types.ModuleType) -> None:
    module._is_cpu = True


class _TorchWithoutPinning(types.ModuleType):
    """`torch` as seen by one module: factory functions ignore `pin_memory`, everything else is torch itself."""

    def __init__(self) -> None:
        super().__init__("torch")
        import torch

        self._torch = torch
        for name in _PIN_FACTORIES:
            setattr(self, name, self._unpinned(getattr(torch, name)))

    @staticmethod
    def _unpinned(factory: Callable) -> Callable:
        def call(*args, **kwargs):
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        return call

    def __getattr__(self, name: str):
        return getattr(self._torch, name)


def _drop_pin_memory_kwarg(module: types.ModuleType) -> None:
    module.torch = _TorchWithoutPinning()


# -- post-import hook -------------------------------------------------------------------------------------------
_PENDING: dict[str, Callable[[types.ModuleType], None]] = {}


def _on_import(name: str, patch: Callable[[types.ModuleType], None]) -> None:
    if name in sys.modules:
        patch(sys.modules[name])
        return
    _PENDING[name] = patch
    if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, _PENDING.pop(fullname))
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch: Callable[[types.ModuleType], None]) -> None:
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)
