"""Load a local HF Qwen3 directory: check config.json, build the engine model, copy safetensors weights by HF name."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sparrow_sgl.config import ConfigError
from sparrow_sgl.engine.model import Qwen3ForCausalLM
from sparrow_sgl.jsonio import read_json

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("qwen3",)
_IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)


def read_hf_config(model_dir: str | Path):
    """The model's `transformers` config, after checking that the engine implements its architecture."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"model directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path} has no config.json: not a Hugging Face model directory")
    raw = read_json(config_file, "model config")
    architectures, model_type = raw.get("architectures") or [], raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES or (
        architectures and not set(architectures) & set(SUPPORTED_ARCHITECTURES)
    ):
        raise ConfigError(
            f"unsupported model in {path}: architectures={architectures}, model_type={model_type!r}; the embedded "
            f"engine implements {', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    from transformers import Qwen3Config

    hf_config = Qwen3Config.from_pretrained(path)
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act {hf_config.hidden_act!r} is not supported (only silu)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ConfigError(f"{path}: sliding-window attention is not supported by the embedded engine")
    return hf_config


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def weight_files(model_dir: str | Path) -> list[Path]:
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ConfigError(f"{path}: shards named in {index.name} are missing: {missing}")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path} holds no safetensors weights (model.safetensors or a sharded index)")
    return files


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(model_dir: str | Path, hf_config, device: str, dtype: torch.dtype) -> Qwen3ForCausalLM:
    """Build the model without initialising it, then fill every parameter from the checkpoint."""
    with torch.device("meta"), _default_dtype(dtype):
        model = Qwen3ForCausalLM(hf_config)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty materialises shared parameters separately
    model.init_rotary()
    load_weights(model, iter_checkpoint(model_dir), require_all=True, where=str(model_dir))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def load_weights(
    model: Qwen3ForCausalLM,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    require_all: bool = False,
    where: str = "weights",
) -> set[str]:
    """Copy (HF name, tensor) pairs into the model in place; unknown names or wrong shapes raise. Returns the names."""
    params = model.hf_parameters()
    loaded, unknown = set(), []
    for name, tensor in weights:
        if name.endswith(_IGNORED_WEIGHTS):
            continue
        target = params.get(name)
        if target is None:
            unknown.append(name)
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            raise ConfigError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        loaded.add(name)
    if unknown:
        raise ConfigError(f"{where}: unknown parameter name(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if require_all:
        optional = {"lm_head.weight"} if model.tie_word_embeddings else set()
        missing = sorted(set(params) - loaded - optional)
        if missing:
            raise ConfigError(f"{where}: checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:5]}")
    return loaded


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(model_dir: str | Path):
    """The model dir's tokenizer; a dir without one (a bare weights export) is refused by name."""
    path = Path(model_dir)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): copy the tokenizer files of the model it "
            "came from into it"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: its tokenizer files cannot be loaded ({e})") from e


def eos_token_ids(model_dir: str, hf_config, tokenizer) -> frozenset[int]:
    ids: set[int] = set()

    def add(value) -> None:
        if value is None:
            return
        ids.update([value] if isinstance(value, int) else value)

    add(getattr(hf_config, "eos_token_id", None))
    gen_file = Path(model_dir) / "generation_config.json"
    if gen_file.is_file():
        add(json.loads(gen_file.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return frozenset(ids)
