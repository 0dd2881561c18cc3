"""Hardware and model-shape presets for the cost model, as data.

Hardware numbers are vendor peaks (dense bf16 tensor-core FLOP/s, HBM bandwidth), not achieved rates: the cost
model only uses their ratio and scale, so a constant efficiency factor cancels out of every speedup.
Qwen3 shapes are the `config.json` files of the Hugging Face repos Qwen/Qwen3-{1.7B,4B,8B,14B}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sparrow_sgl.config import ConfigError
from sparrow_sgl.jsonio import read_json


@dataclass(slots=True, frozen=True)
class Hardware:
    """One accelerator: peak compute in FLOP/s and memory bandwidth in bytes/s."""

    name: str
    peak_flops: float
    bandwidth: float

    def __post_init__(self) -> None:
        if self.peak_flops <= 0 or self.bandwidth <= 0:
            raise ConfigError(f"hardware {self.name!r}: peak_flops and bandwidth must be > 0")

    @property
    def flops_per_byte(self) -> float:
        """I in the paper's eFLOPs: how many FLOPs one byte of memory traffic is worth."""
        return self.peak_flops / self.bandwidth


HARDWARE: dict[str, Hardware] = {
    # NVIDIA H100 SXM5: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3.
    "h100": Hardware("h100", 989e12, 3.35e12),
    # NVIDIA H200 SXM: same compute die as H100, 4.8 TB/s HBM3e.
    "h200": Hardware("h200", 989e12, 4.8e12),
    # NVIDIA A100 SXM 80GB: 312 TFLOP/s dense bf16, 2.04 TB/s.
    "a100": Hardware("a100", 312e12, 2.04e12),
    # A modest server CPU socket: ~2 TFLOP/s fp32 with AVX-512 FMA, ~100 GB/s DDR.
    "cpu": Hardware("cpu", 2e12, 100e9),
}


def get_hardware(name: str | Hardware) -> Hardware:
    if isinstance(name, Hardware):
        return name
    key = str(name).lower()
    if key not in HARDWARE:
        raise ConfigError(f"unknown hardware {name!r}; known: {', '.join(sorted(HARDWARE))}")
    return HARDWARE[key]


@dataclass(slots=True, frozen=True)
class ModelShape:
    """The dimensions of a dense decoder-only transformer that decode cost depends on."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model shape {self.name!r}: {key} must be >= 1, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model shape {self.name!r}: num_heads ({self.num_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def layer_params(self) -> int:
        """Weights of one layer's matmuls: q, k, v, o projections and the gated MLP (norms are negligible)."""
        q_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        return q_o + k_v + mlp

    @property
    def matmul_params(self) -> int:
        """Weights every decoded token multiplies through: all layers plus the LM head."""
        return self.num_layers * self.layer_params + self.hidden_size * self.vocab_size

    @property
    def params(self) -> int:
        """Total parameter count (the embedding counted once more when it is not tied to the LM head)."""
        embed = 0 if self.tie_word_embeddings else self.hidden_size * self.vocab_size
        return self.matmul_params + embed

    @property
    def kv_dim(self) -> int:
        """Elements of K and V stored per token and layer (2 * kv_heads * head_dim)."""
        return 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config, name: str = "") -> ModelShape:
        """From a `transformers` config object or a plain dict of config.json keys."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        try:
            hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
            return cls(
                name=name or str(get("_name_or_path", "") or get("model_type", "") or "model"),
                num_layers=int(get("num_hidden_layers")),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads),
                intermediate_size=int(get("intermediate_size")),
                vocab_size=int(get("vocab_size")),
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            )
        except TypeError as e:
            raise ConfigError(f"model config {name!r} lacks a field the cost model needs: {e}") from e


def _qwen3(name, layers, hidden, heads, inter, tied) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, 8, 128, inter, 151936, tied)


MODEL_SHAPES: dict[str, ModelShape] = {
    "qwen3-1.7b": _qwen3("qwen3-1.7b", 28, 2048, 16, 6144, True),
    "qwen3-4b": _qwen3("qwen3-4b", 36, 2560, 32, 9728, True),
    "qwen3-8b": _qwen3("qwen3-8b", 36, 4096, 32, 12288, False),
    "qwen3-14b": _qwen3("qwen3-14b", 40, 5120, 40, 17408, False),
}


def get_model_shape(spec: str | os.PathLike | ModelShape | dict) -> ModelShape:
    """A named shape (`qwen3-4b`), a model dir or config.json path, a config dict, or a ModelShape."""
    if isinstance(spec, ModelShape):
        return spec
    if isinstance(spec, dict):
        return ModelShape.from_hf_config(spec)
    key = str(spec).lower()
    if key in MODEL_SHAPES:
        return MODEL_SHAPES[key]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        data = read_json(path, "model config")
        data = data.get("text_config", data)
        return ModelShape.from_hf_config(data, name=path.parent.name)
    raise ConfigError(
        f"unknown model {spec!r}: give one of {', '.join(MODEL_SHAPES)} or a model dir with a config.json"
    )
