"""Token sampling in one launch: per row, the log-sum-exp of logits / temperature, the greedy argmax or the draw by
inverse CDF from a given uniform, and the chosen token's log-prob (engine/sampler.py's semantics, unfiltered rows).

The torch sampler materialises [B, V] float32 tensors for log_softmax, exp and cumsum and copies three small inputs
and four outputs between host and device: with Qwen3's 151936-token vocabulary that was 0.6-1.3 ms a decode step
on an H200 at batch 32 (bench/results/NOTES.md, engine overhead), for ~20 us of memory traffic. Here one program
per row reads its logits twice: an online max / sum-exp (and argmax) pass, then a running sum that stops at the
block where it reaches u x total. The draw is the torch sampler's rule — the first token whose cumulative
probability reaches u x total — up to float32 summation order (a different token only when u x total falls within
rounding of a boundary); a total that rounding leaves short of u x total takes the last token of nonzero
probability.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sample_kernel(
    logits_ptr, stride, vocab, inv_temp_ptr, uniform_ptr, greedy_ptr,
    token_ptr, logp_ptr, lse_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    inv_t = tl.load(inv_temp_ptr + row)
    greedy = tl.load(greedy_ptr + row) != 0
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int64)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32) * inv_t
        block_max = tl.max(x, axis=0)
        first = tl.min(tl.where(x == block_max, cols, vocab), axis=0).to(tl.int64)
        better = block_max > best  # strictly: an equal later maximum keeps the first index (torch.argmax's)
        best_idx = tl.where(better, first, best_idx)
        best = tl.maximum(best, block_max)
        new_m = tl.maximum(m, block_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
    lse = m + tl.log(s)
    target = tl.load(uniform_ptr + row) * s
    token = best_idx
    acc = tl.zeros((), tl.float32)
    last_nonzero = best_idx
    found = greedy.to(tl.int32)
    start = 0
    while (start < vocab) & (found == 0):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(x - m)
        running = tl.cumsum(p, axis=0) + acc
        hit = tl.min(tl.where(running >= target, cols, vocab), axis=0).to(tl.int64)
        token = tl.where(hit < vocab, hit, token)
        found = (hit < vocab).to(tl.int32)
        last_nonzero = tl.maximum(last_nonzero, tl.max(tl.where(p > 0, cols, -1), axis=0).to(tl.int64))
        acc += tl.sum(p, axis=0)
        start += BLOCK
    token = tl.where(found != 0, token, last_nonzero)
    chosen = tl.load(base + token).to(tl.float32) * inv_t - lse
    tl.store(token_ptr + row, token)
    tl.store(logp_ptr + row, chosen)
    tl.store(lse_ptr + row, lse)


def sample(logits: torch.Tensor, inv_temperature: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor,
           block: int = 4096, num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [B] int64, their log-probs [B] float32, log-sum-exp of logits * inv_temperature [B] float32) for
    logits [B, V] (rows contiguous), inv_temperature / uniform [B] float32 (u in (0, 1]), greedy [B] (nonzero: take
    the argmax; pass inv_temperature 1 for those rows)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [B, V] with contiguous rows, got {tuple(logits.shape)}")
    rows = logits.shape[0]
    for name, t in (("inv_temperature", inv_temperature), ("uniform", uniform), ("greedy", greedy)):
        if t.shape != (rows,) or t.device != logits.device:
            raise ValueError(f"{name} must be [{rows}] on {logits.device}, got {tuple(t.shape)} on {t.device}")
    token = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(block, triton.next_power_of_2(logits.shape[1]))
        _sample_kernel[(rows,)](
            logits, logits.stride(0), logits.shape[1], inv_temperature.float().contiguous(),
            uniform.float().contiguous(), greedy.to(torch.int32),
            token, logp, lse, BLOCK=block, num_warps=num_warps,
        )
    return token, logp, lse


def sample_packed(logits: torch.Tensor, inv_temperature: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor,
                  topk: int, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """`sample`, packed for one device-to-host copy: float64 [B, 2 + len(extra) + 2 topk] = token id, its log-prob,
    the `extra` [B] columns, the top-k ids and their log-probs (float64 holds every id exactly)."""
    token, chosen, lse = sample(logits, inv_temperature, uniform, greedy)
    parts = [token[:, None].double(), chosen[:, None].double(), *(t[:, None].double() for t in extra)]
    if topk:
        top_vals, top_ids = logits.float().topk(topk, dim=-1)  # the order of logits * inv_temperature too
        parts += [top_ids.double(), (top_vals * inv_temperature[:, None] - lse[:, None]).double()]
    return torch.cat(parts, dim=1)
