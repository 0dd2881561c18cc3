"""Import shims for the two modules OpenRLHF imports at module level but this integration never runs: `vllm` and
`flash_attn`. Installed only when the real package is absent; nothing else (OpenRLHF, our code) is ever stubbed.

- `vllm`: `samples_generator.py:7` and `vllm_engine.py:7-12` import `SamplingParams`, `vllm.inputs.TokensPrompt`,
  `vllm.utils.random_uuid` and read `vllm.__version__`; the pickled `SamplingParams` travels to the rollout actor.
- `flash_attn`: `models/ring_attn_utils.py:3-4` (ring attention, imported by the DeepSpeed strategy) needs
  `flash_attn.bert_padding` and `flash_attn.utils.distributed`; ring attention itself stays unsupported here.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
import uuid
from dataclasses import dataclass

SHIM_VLLM_VERSION = "0.29.0"  # what OpenRLHF 0.11.2 pins; >= 0.16 keeps its NCCL_CUMEM workaround off


@dataclass
class SamplingParams:
    """The fields OpenRLHF sets (`samples_generator.py` `_dispatch_prompts_to_vllm`), with vLLM's defaults."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False


def TokensPrompt(prompt_token_ids: list[int], **kw) -> dict:  # noqa: N802  (vLLM's TypedDict constructor name)
    return {"prompt_token_ids": prompt_token_ids, **kw}


def random_uuid() -> str:
    return uuid.uuid4().hex


def _unsupported(name: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"flash_attn.{name} is a sparrow-sgl import shim (flash-attn is not installed)")

    return fail


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    mod.__path__ = []
    mod.__sparrow_shim__ = True
    mod.__dict__.update(attrs)
    return mod


def _missing(name: str) -> bool:
    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def install_vllm() -> bool:
    if not _missing("vllm"):
        return False
    vllm = _module("vllm", __version__=SHIM_VLLM_VERSION, SamplingParams=SamplingParams)
    vllm.inputs = _module("vllm.inputs", TokensPrompt=TokensPrompt)
    vllm.utils = _module("vllm.utils", random_uuid=random_uuid)
    sys.modules.update({"vllm": vllm, "vllm.inputs": vllm.inputs, "vllm.utils": vllm.utils})
    return True


def install_flash_attn() -> bool:
    """The two submodules OpenRLHF imports (flash-attn-4, which SGLang brings, is a `flash_attn` namespace without
    them); the root and `flash_attn.utils` are shimmed only when absent too."""
    if not _missing("flash_attn.bert_padding") and not _missing("flash_attn.utils.distributed"):
        return False
    from einops import rearrange

    padding = _module(
        "flash_attn.bert_padding",
        rearrange=rearrange,
        **{n: _unsupported(f"bert_padding.{n}") for n in ("index_first_axis", "pad_input", "unpad_input")},
    )
    distributed = _module("flash_attn.utils.distributed", all_gather=_unsupported("utils.distributed.all_gather"))
    modules = {"flash_attn.bert_padding": padding, "flash_attn.utils.distributed": distributed}
    if _missing("flash_attn.utils"):
        modules["flash_attn.utils"] = _module("flash_attn.utils")
    if _missing("flash_attn"):
        modules["flash_attn"] = _module("flash_attn")
    sys.modules.update(modules)
    root, utils = importlib.import_module("flash_attn"), importlib.import_module("flash_attn.utils")
    root.bert_padding, utils.distributed = padding, distributed
    return True


def install() -> list[str]:
    """Install the shims that are needed; returns the names of those installed."""
    return [name for name, fn in (("vllm", install_vllm), ("flash_attn", install_flash_attn)) if fn()]


def is_shim(module: types.ModuleType) -> bool:
    return bool(getattr(module, "__sparrow_shim__", False))
