"""φ, the rollout-only LoRA of DistillSparse, on a parameter-sharing shadow of the dense policy θ.

The trainer's policy stays a plain transformers model: its module tree, `state_dict()` names (what the engine's
`update_weights` and checkpoints read) and forward never see the adapter. φ lives on a *shadow* model built on
the meta device whose every parameter and buffer *is* θ's tensor (no copy), wrapped by peft. So
- the shadow's forward = θ + φ (sparse attention is added by `distill.sparse_forward`);
- a policy step backpropagates through the policy only: φ gets no gradient;
- a distill step runs inside `frozen_base()`: θ's tensors stop requiring grad, so only φ gets one.
Adapters are saved in peft format (what `Engine.set_adapter` reads); `save_merged` writes θ + φ as plain HF
weights for engines that only take full checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from distill.config import DistillConfig
from sparrow_sgl.config import ConfigError


class RolloutLora:
    def __init__(self, policy: torch.nn.Module, cfg: DistillConfig | None = None) -> None:
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg or DistillConfig()
        self.policy = policy
        names = [n for n, _ in policy.named_modules()]
        missing = [m for m in self.cfg.target_modules if not any(n.endswith(f".{m}") for n in names)]
        if missing:
            raise ConfigError(f"distill.target_modules {missing} match no layer of {type(policy).__name__}")
        lora = LoraConfig(
            r=self.cfg.rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=list(self.cfg.target_modules),
            bias="none",
        )
        trainable = [p for p in policy.parameters() if p.requires_grad]
        self.model = get_peft_model(shadow_of(policy), lora)
        for p in trainable:  # peft freezes the base it wraps — here θ's own tensors, which the policy step trains
            p.requires_grad_(True)

    # -- parameters ---------------------------------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        """φ: the LoRA A/B matrices (the only tensors the distill optimizer updates)."""
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors from `adapter_state()` back into φ (in place: an optimizer over φ stays attached)."""
        from peft import set_peft_model_state_dict

        expected = set(self.adapter_state())
        if set(state) != expected:
            raise ConfigError(f"LoRA state does not fit this adapter: missing {sorted(expected - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - expected)[:5]}")
        set_peft_model_state_dict(self.model, state)

    @contextlib.contextmanager
    def frozen_base(self) -> Iterator[None]:
        """θ stops requiring grad (so a backward only reaches φ); restored on exit."""
        base = [p for p in self.policy.parameters() if p.requires_grad]
        for p in base:
            p.requires_grad_(False)
        for p in self.parameters():
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in base:
                p.requires_grad_(True)

    # -- save / load --------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """peft adapter dir (adapter_config.json + adapter_model.safetensors)."""
        path = Path(path)
        self.model.save_pretrained(str(path))
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Load φ saved by `save` (or any peft LoRA of the same shape) into this adapter."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"LoRA adapter not found: {path} has no adapter_config.json")
        result = set_peft_model_state_dict(self.model, load_peft_weights(str(path), device="cpu"))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ConfigError(f"{path}: adapter tensors that match no LoRA layer here: {unexpected[:5]}")

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """θ + φ under the policy's own parameter names (what an engine that only takes full weights needs)."""
        state = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        for name, module in self.model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                key = name.removeprefix("base_model.model.") + ".weight"
                state[key] = state[key] + module.get_delta_weight("default").to(state[key].dtype)
        return state

    def save_merged(self, path: str | os.PathLike, tokenizer=None) -> Path:
        """A plain HF checkpoint of θ + φ (config, safetensors, and the tokenizer when given)."""
        path = Path(path)
        self.policy.save_pretrained(str(path), state_dict=self.merged_state_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        return path


def shadow_of(policy: torch.nn.Module) -> torch.nn.Module:
    """A second module tree of the same class whose parameters and buffers are the policy's own tensors."""
    config = copy.deepcopy(policy.config)  # its own config: the sparse forward switches the attention impl on it
    with torch.device("meta"):
        shadow = type(policy)(config)
    for name, param in policy.named_parameters(remove_duplicate=False):
        _set_tensor(shadow, name, param, "_parameters")
    for name, buffer in policy.named_buffers(remove_duplicate=False):
        _set_tensor(shadow, name, buffer, "_buffers")
    left = [n for n, t in [*shadow.named_parameters(), *shadow.named_buffers()] if t.is_meta]
    if left:
        raise ConfigError(f"could not share the policy's tensors with the rollout shadow: {left[:5]}")
    return shadow.train(policy.training)


def _set_tensor(root: torch.nn.Module, name: str, tensor: torch.Tensor, slot: str) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    getattr(module, slot)[leaf] = tensor
