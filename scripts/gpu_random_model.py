"""A Qwen3-shaped model with random weights and the testbed's tokenizer, for GPU runs where decode must be
bandwidth-bound (issue 20: the 1 M-parameter testbed model answers in ~8 tokens, so its rollouts are prefill-bound).

The special tokens' LM-head rows are zero and the rest are scaled up, so sampling at temperature 1 almost never
emits <|im_end|>: every response runs to max_new_tokens, which OpenRLHF cannot force (it has no ignore-EOS).

    python scripts/gpu_random_model.py SRC_MODEL_DIR OUT_DIR [--shape qwen3-0.6b]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, Qwen3Config, Qwen3ForCausalLM

# (hidden, layers, heads, kv heads, intermediate); head_dim 128 as in the released Qwen3 models
SHAPES = {
    "qwen3-0.6b": (1024, 28, 16, 8, 3072),
    "qwen3-1.7b": (2048, 28, 16, 8, 6144),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
LOGIT_SCALE = 10.0  # random logits with std ~6: the zeroed special tokens sit ~3 std below the top tokens


def special_ids(src: Path) -> list[int]:
    """Ids of the tokenizer's added (special) tokens: <|im_end|>, <|endoftext|>, ..."""
    return [t["id"] for t in json.loads((src / "tokenizer.json").read_text())["added_tokens"]]


def build(src: Path, out: Path, shape: str, seed: int = 0) -> Path:
    """Write a random `shape` model with src's tokenizer and special tokens into out."""
    base = AutoConfig.from_pretrained(src)
    hidden, layers, heads, kv_heads, inter = SHAPES[shape]
    config = Qwen3Config(
        vocab_size=base.vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
        bos_token_id=getattr(base, "bos_token_id", None), dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        head = model.lm_head.weight
        head.mul_(LOGIT_SCALE)
        head[special_ids(src)] = 0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"random {shape}: {params / 1e6:.0f} M parameters, vocab {config.vocab_size} -> {out}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    args = p.parse_args()
    build(args.src, args.out, args.shape)


if __name__ == "__main__":
    main()
