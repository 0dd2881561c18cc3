"""Supervised warm-up on a task's reference answers, so that GRPO starts from non-zero rewards.

A random tiny model never answers the chain task, and GRPO learns nothing from groups whose rewards are all 0.
A short cross-entropy phase on `prompt -> reference + EOS` (loss on the response tokens only) teaches the format
and the long-range lookups; RL then sharpens them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow_sgl.rl.tasks import Task, encode_prompt


@dataclass(slots=True)
class WarmupResult:
    losses: list[float]  # nats per response token, one per step
    accuracy: list[tuple[int, float]]  # (step, teacher-forced response-token accuracy) at each evaluation


def reference_examples(tokenizer, task: Task, indices) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference response ids + EOS) for the task samples `indices`."""
    out = []
    for i in indices:
        sample = task.sample(i)
        if not sample.reference:
            raise ValueError(f"task {task.name!r} sample {i} has no reference answer to warm up on")
        response = tokenizer.encode(sample.reference, add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append((encode_prompt(tokenizer, sample.prompt), response))
    return out


def pack(examples, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, L], attention mask [B, L] and the mask of response *targets* [B, L - 1]."""
    length = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attn = torch.zeros(len(examples), length, dtype=torch.bool)
    target = torch.zeros(len(examples), length - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(examples):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = True
        target[i, len(p) - 1 : len(p) + len(r) - 1] = True  # logits at j predict token j + 1
    return ids.to(device), attn.to(device), target.to(device)


def supervised_warmup(
    model,
    tokenizer,
    task: Task,
    *,
    steps: int,
    batch: int = 8,
    lr: float = 3e-3,
    offset: int = 0,
    eval_every: int = 0,
    eval_indices=range(10**9, 10**9 + 16),
    pool: int | None = None,
    progress: bool = True,
) -> WarmupResult:
    """AdamW with 10% linear warm-up on task samples offset, offset + 1, ...; trains `model` in place.

    pool: cycle over this many distinct samples (tokenized once) instead of fresh ones every step — the CPU cost
    of building and tokenizing long prompts otherwise dominates a tiny model's step on a GPU.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    result = WarmupResult([], [])
    cache: dict[int, tuple[list[int], list[int]]] = {}

    def example(i: int):
        i = offset + (i % pool if pool else i)
        if i not in cache:
            cache[i] = reference_examples(tokenizer, task, [i])[0]
        return cache[i] if pool else cache.pop(i)

    bar = tqdm(range(steps), desc="warm-up", unit="step", disable=not progress)
    for step in bar:
        model.train()
        ids, attn, target = pack([example(step * batch + j) for j in range(batch)], pad, device)
        logits = model(input_ids=ids, attention_mask=attn.long(), use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[target].float(), ids[:, 1:][target])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        result.losses.append(float(loss.detach()))
        if eval_every and (step + 1) % eval_every == 0:
            result.accuracy.append((step + 1, response_accuracy(model, tokenizer, task, eval_indices)))
            bar.set_postfix_str(f"loss {result.losses[-1]:.3f} nats/token, acc {result.accuracy[-1][1]:.3f}")
        else:
            bar.set_postfix_str(f"loss {result.losses[-1]:.3f} nats/token")
    model.eval()
    return result


@torch.no_grad()
def response_accuracy(model, tokenizer, task: Task, indices) -> float:
    """Fraction of reference response tokens that are the model's argmax when teacher-forced."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, attn, target = pack(reference_examples(tokenizer, task, indices), pad, device)
    logits = model(input_ids=ids, attention_mask=attn.long(), use_cache=False).logits[:, :-1]
    correct = logits.argmax(-1)[target] == ids[:, 1:][target]
    model.train(was_training)
    return float(correct.float().mean())
