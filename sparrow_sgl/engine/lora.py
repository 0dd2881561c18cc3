"""peft LoRA adapters merged into the served weights (rollout-only LoRA of DistillSparse).

`set_adapter(path)` merges W += scale * B @ A for every adapted linear layer; the base values of those weights are
kept (on CPU) so `set_adapter(None)` or a new adapter restores them exactly, and `update_weights` can update the
base and re-merge.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparrow_sgl.config import ConfigError

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclass
class LoraAdapter:
    path: str
    a: dict[str, torch.Tensor]  # HF parameter name (module + ".weight") -> A [r, in]
    b: dict[str, torch.Tensor]  # -> B [out, r]
    scale: dict[str, float]
    fan_in_fan_out: bool = False

    @property
    def targets(self) -> list[str]:
        return sorted(self.a)

    def delta(self, name: str) -> torch.Tensor:
        """scale * B @ A in float32 (CPU)."""
        delta = self.scale[name] * (self.b[name].float() @ self.a[name].float())
        return delta.T if self.fan_in_fan_out else delta

    @classmethod
    def load(cls, path: str | Path) -> LoraAdapter:
        path = Path(path)
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise ConfigError(f"LoRA adapter not found: {path} has no adapter_config.json")
        config = json.loads(config_file.read_text())
        if config.get("use_dora"):
            raise ConfigError(f"{path}: DoRA adapters are not supported (only plain LoRA)")
        if config.get("modules_to_save"):
            raise ConfigError(f"{path}: adapters with modules_to_save ({config['modules_to_save']}) are not supported")
        a, b = {}, {}
        for key, tensor in _read_adapter_weights(path):
            match = _LORA_KEY.match(key)
            if match is None:
                raise ConfigError(f"{path}: unsupported adapter tensor {key!r} (only lora_A / lora_B weights)")
            name = match["module"].removeprefix(_PEFT_PREFIX) + ".weight"
            (a if match["part"] == "A" else b)[name] = tensor
        if set(a) != set(b) or not a:
            raise ConfigError(f"{path}: lora_A and lora_B weights do not pair up (or the adapter is empty)")
        scale = {name: _scale(config, name.removesuffix(".weight"), a[name].shape[0]) for name in a}
        return cls(str(path), a, b, scale, bool(config.get("fan_in_fan_out", False)))


def _read_adapter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        yield from load_file(str(path / "adapter_model.safetensors")).items()
    elif (path / "adapter_model.bin").is_file():
        yield from torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True).items()
    else:
        raise ConfigError(f"{path} has no adapter_model.safetensors (or adapter_model.bin)")


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name or a dotted suffix of it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


class AdapterMerger:
    """Keeps the served weights = base weights + the active adapter's delta."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self.params = params  # HF name -> live view into the model
        self.base: dict[str, torch.Tensor] = {}
        self.active: LoraAdapter | None = None

    @torch.no_grad()
    def set(self, path: str | Path | None) -> None:
        adapter = LoraAdapter.load(path) if path is not None else None
        if adapter is not None:
            unknown = [n for n in adapter.targets if n not in self.params]
            if unknown:
                raise ConfigError(f"{path}: adapter targets layers the model lacks: {unknown[:5]}")
            for name in adapter.targets:
                expected = tuple(self.params[name].shape)
                if tuple(adapter.delta(name).shape) != expected:
                    raise ConfigError(f"{path}: LoRA delta for {name} does not match the weight shape {expected}")
        self._restore()
        self.active = adapter
        if adapter is None:
            return
        for name in adapter.targets:
            self.base[name] = self.params[name].detach().to("cpu", copy=True)
            self._merge(name)

    def _restore(self) -> None:
        for name, base in self.base.items():
            self.params[name].copy_(base)
        self.base.clear()

    def _merge(self, name: str) -> None:
        merged = self.base[name].float() + self.active.delta(name)
        self.params[name].copy_(merged)

    def route_update(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass base-weight updates through, redirecting merged weights into the kept base and yielding base+delta."""
        for name, tensor in weights:
            if name in self.base:
                if tuple(tensor.shape) != tuple(self.base[name].shape):
                    expected = tuple(self.base[name].shape)
                    raise ConfigError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
                self.base[name].copy_(tensor)
                merged = self.base[name].float() + self.active.delta(name)
                yield name, merged
            else:
                yield name, tensor
