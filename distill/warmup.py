"""A tiny Qwen3 warmed up on the synthetic chain task, so its attention has structure for sparse rollouts to miss.

A random tiny model attends almost uniformly: any page selection changes its outputs little, and DistillSparse has
nothing to fix. A few hundred supervised steps on chain-task answers (`x12 = x7 = x3 = 5`: every hop looks up an
assignment far back in the prompt) teach it the long-range lookups that an aggressive KV budget cuts off.
CPU-sized: the defaults run in a few minutes on two cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sparrow_sgl.tiny import TinyModelSpec, save_tiny_model

DEFAULT_TASK = {"num_vars": 48, "hops": 8}
DEFAULT_SPEC = {"hidden_size": 128, "head_dim": 32, "intermediate_size": 256, "vocab_size": 1024}


def chain_examples(tokenizer, task, indices) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference response ids + EOS) for task samples `indices`."""
    from sparrow_sgl.rl.tasks import encode_prompt

    out = []
    for i in indices:
        sample = task.sample(i)
        response = tokenizer.encode(sample.reference, add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append((encode_prompt(tokenizer, sample.prompt), response))
    return out


def copy_examples(tokenizer, indices, words: int = 64, vocab: int = 48, seed: int = 0):
    """(prompt ids, response ids + EOS): "repeat: x3 x17 ..." answered by the same words — each response token is a
    lookup of the prompt token after the previous one (an induction head), the pattern sparse attention can miss."""
    import random

    from sparrow_sgl.rl.tasks import encode_prompt

    out = []
    for i in indices:
        rng = random.Random(seed * 1_000_003 + i)
        text = " ".join(f"x{rng.randrange(vocab)}" for _ in range(words))
        response = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append((encode_prompt(tokenizer, f"repeat: {text}"), response))
    return out


def warm_up_chain_model(
    out_dir: str | os.PathLike,
    *,
    steps: int = 300,
    batch: int = 8,
    lr: float = 3e-3,
    task_args: dict | None = None,
    spec: dict | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Build a tiny model + tokenizer for the chain task, train it on reference answers, save it (HF format)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from distill.sparse_forward import pack_right_padded
    from sparrow_sgl.rl.tasks import ChainTask

    task_args = dict(task_args or {})
    copy = task_args.pop("copy_words", None)  # set: warm up on the copy task with that many words instead
    task = ChainTask(**{**DEFAULT_TASK, **task_args, "seed": seed})
    out_dir = Path(out_dir)
    save_tiny_model(out_dir, TinyModelSpec(**{**DEFAULT_SPEC, **(spec or {}), "seed": seed}), task.corpus(256))
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = Qwen3ForCausalLM.from_pretrained(out_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    bar = tqdm(range(steps), desc="warm-up", unit="step", disable=not progress)
    for step in bar:
        indices = range(step * batch, (step + 1) * batch)
        if copy:
            examples = copy_examples(tokenizer, indices, words=copy, seed=seed)
        else:
            examples = chain_examples(tokenizer, task, indices)
        input_ids, prompt_lens, response_lens = pack_right_padded(*zip(*examples))
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        targets = input_ids[:, 1:]
        col = torch.arange(targets.shape[1])[None, :] + 1  # column of the target token
        mask = (col >= prompt_lens[:, None]) & (col < (prompt_lens + response_lens)[:, None])
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix_str(f"loss {float(loss):.3f} nats/token")
    model.eval().save_pretrained(out_dir)
    return out_dir
