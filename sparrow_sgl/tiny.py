"""Tiny random Qwen3 models and an offline byte-level BPE tokenizer, for tests and the CPU demo.

Nothing here downloads: the tokenizer is trained in memory on a small built-in corpus (plus any text given), and
the model is a randomly initialised `transformers.Qwen3ForCausalLM` saved in HF format, so it loads through the
same path as a real checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_BUILTIN_CORPUS = """\
Question: what is the value of x? Let's think step by step. The answer is \\boxed{42}.
a = 3 ; b = a + 4 ; c = b * 2 ; so c = 14 . x1 = 7 ; x2 = x1 + 5 ; x3 = x2 - 2 .
def add(a, b):\n    return a + b\nprint(add(1, 2))\nassert add(2, 2) == 4
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32
The quick brown fox jumps over the lazy dog. #### 18 = + - * / ( ) [ ] { } < > , . ; : ? !
"""


@dataclass(slots=True)
class TinyModelSpec:
    """Shape of a tiny Qwen3. Defaults give a ~1M-parameter model that runs a 4K-token forward on CPU in seconds."""

    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    seed: int = 0


def build_tokenizer(vocab_size: int = 512, extra_text: list[str] | None = None):
    """A byte-level BPE (every string encodes) with Qwen3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_BUILTIN_CORPUS, *(extra_text or [])], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = QWEN3_CHAT_TEMPLATE
    return fast


def tiny_qwen3_config(spec: TinyModelSpec, tokenizer=None):
    from transformers import Qwen3Config

    vocab = max(spec.vocab_size, len(tokenizer)) if tokenizer is not None else spec.vocab_size
    eos = tokenizer.eos_token_id if tokenizer is not None else vocab - 1
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_word_embeddings,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )


def build_tiny_model(spec: TinyModelSpec | None = None, tokenizer=None):
    """A randomly initialised `Qwen3ForCausalLM` (float32, eval mode), seeded by `spec.seed`."""
    import torch
    from transformers import Qwen3ForCausalLM

    spec = spec or TinyModelSpec()
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(spec, tokenizer))
    return model.eval()


def save_tiny_model(path: str | os.PathLike, spec: TinyModelSpec | None = None, extra_text: list[str] | None = None):
    """Build tokenizer + random model and save both in HF format under `path`; returns the path."""
    spec = spec or TinyModelSpec()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, extra_text)
    model = build_tiny_model(spec, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
