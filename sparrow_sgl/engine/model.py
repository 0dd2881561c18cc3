"""Qwen3 decoder for the engine: HF-equivalent math on packed tokens, paged sparse-capable attention.

Tokens of all sequences of a step are packed into one [T] batch (no padding); attention metadata comes from the
step `Context`. q/k/v and gate/up projections are fused for speed, but `hf_parameters()` exposes views with the
HF parameter names so that loading, `update_weights` and LoRA merging work in HF names. The elementwise chains
(residual add + RMSNorm, q/k norm + rotary, SiLU x up) are single ops from `engine/fused.py`: Triton kernels on
CUDA, the plain torch math on CPU; each layer hands its residual stream to the next one's fused add + norm.
"""

from __future__ import annotations

import torch
from torch import nn

from sparrow_sgl.engine import fused
from sparrow_sgl.engine.attention import PagedAttention
from sparrow_sgl.engine.fused import apply_rotary  # noqa: F401 - re-exported (bench, older imports)
from sparrow_sgl.engine.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None -> (norm(x), x). One fused kernel on CUDA."""
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding:
    """Rotary position embedding with the HF config's rope parameters (inverse frequencies and attention scaling)."""

    def __init__(self, hf_config, head_dim: int, device: torch.device) -> None:
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            self.scaling = 1.0
        elif rope_type.startswith("dynamic"):
            raise ValueError(f"rope_type {rope_type!r} (length-dependent frequencies) is not supported by the engine")
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device)
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] in `dtype` for positions [T]."""
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q/k norm + rotary happen in the attention layer, so the CUDA decode step can fuse them with the KV append."""
        out = self.attn.forward_qkv(self.qkv_proj(x), self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin)
        return self.o_proj(out.flatten(1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x))  # SiLU x up fused into down_proj where chosen


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(cfg, layer_idx)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream before it): the residual add is fused into the next layer's norm."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin), residual)
        return self.mlp(h), residual


class Qwen3Model(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """Built on the meta device by the loader, materialised with `to_empty`, then filled from the checkpoint."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.model = Qwen3Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rotary(self) -> None:
        head_dim = self.model.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding(self.config, head_dim, self.lm_head.weight.device)

    @property
    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Packed input_ids/positions [T] -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def hf_parameters(self) -> dict[str, torch.Tensor]:
        """HF parameter name -> tensor view into this model's (possibly fused) parameters."""
        params: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": self.model.embed_tokens.weight.data,
            "model.norm.weight": self.model.norm.weight.data,
            "lm_head.weight": self.lm_head.weight.data,
        }
        for i, layer in enumerate(self.model.layers):
            attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{i}."
            q, kv = attn.q_size, attn.kv_size
            for kind in ("weight", "bias"):
                fused = getattr(attn.qkv_proj, kind)
                if fused is None:
                    continue
                params[f"{prefix}self_attn.q_proj.{kind}"] = fused.data[:q]
                params[f"{prefix}self_attn.k_proj.{kind}"] = fused.data[q : q + kv]
                params[f"{prefix}self_attn.v_proj.{kind}"] = fused.data[q + kv :]
                if getattr(attn.o_proj, kind) is not None:
                    params[f"{prefix}self_attn.o_proj.{kind}"] = getattr(attn.o_proj, kind).data
            params[f"{prefix}self_attn.q_norm.weight"] = attn.q_norm.weight.data
            params[f"{prefix}self_attn.k_norm.weight"] = attn.k_norm.weight.data
            inter = mlp.intermediate_size
            params[f"{prefix}mlp.gate_proj.weight"] = mlp.gate_up_proj.weight.data[:inter]
            params[f"{prefix}mlp.up_proj.weight"] = mlp.gate_up_proj.weight.data[inter:]
            params[f"{prefix}mlp.down_proj.weight"] = mlp.down_proj.weight.data
            params[f"{prefix}input_layernorm.weight"] = layer.input_layernorm.weight.data
            params[f"{prefix}post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.data
        return params
