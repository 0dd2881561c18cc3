"""Token sampling in one launch: per row, the log-sum-exp of logits / temperature, the greedy argmax or the draw by
inverse CDF from a given uniform, and the chosen token's log-prob (engine/sampler.py's semantics, unfiltered rows).

The torch sampler materialises [B, V] float32 tensors for log_softmax, exp and cumsum and copies three small inputs
and four outputs between host and device: with Qwen3's 151936-token vocabulary that was 0.6-1.3 ms a decode step
on an H200 at batch 32 (bench/results/NOTES.md, engine overhead), for ~20 us of memory traffic. Here each row is
split into chunks, one program each (one program per row used 32 of 132 SMs at batch 32): an online max / sum-exp
(and argmax) pass over its chunk, partials to a workspace, and the row's last program to arrive (an atomic ticket,
as in `triton_linear.py`) combines them in chunk order (deterministic), then walks the row from the chunk where the
mass reaches u x total until the running sum does. The draw is the torch sampler's rule — the first token whose
cumulative probability reaches u x total — up to float32 summation order (a different token only when u x total
falls within rounding of a boundary); a total that rounding leaves short of u x total takes the last token of
nonzero probability walked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparrow_sgl.attention.kernels.triton_linear import workspace


@triton.jit
def _chunk_stats(base, lo, hi, inv_t, offs, BLOCK: tl.constexpr):
    """Online max, sum of exp(x - max) and first argmax of logits * inv_t over [lo, hi)."""
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = lo.to(tl.int64)
    for start in range(lo, hi, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < hi, other=float("-inf")).to(tl.float32) * inv_t
        block_max = tl.max(x, axis=0)
        first = tl.min(tl.where(x == block_max, cols, hi), axis=0).to(tl.int64)
        better = block_max > best  # strictly: an equal later maximum keeps the first index (torch.argmax's)
        best_idx = tl.where(better, first, best_idx)
        best = tl.maximum(best, block_max)
        new_m = tl.maximum(m, block_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
    return m, s, best, best_idx


@triton.jit
def _draw(base, vocab, start, acc, inv_t, m, target, best_idx, greedy, offs, BLOCK: tl.constexpr):
    """The first token from `start` on whose running probability mass (from `acc`) reaches target; greedy rows
    and a mass that rounding leaves short take the argmax / the last token of nonzero probability walked."""
    token = best_idx
    last_nonzero = best_idx
    found = greedy.to(tl.int32)
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
    return tl.where(found != 0, token, last_nonzero)


@triton.jit
def _finish(base, vocab, row, inv_t, greedy, m, s, best_idx, start, acc, uniform_ptr, out_ptr, stride_out, lse_ptr,
            offs, BLOCK: tl.constexpr):
    lse = m + tl.log(s)
    target = tl.load(uniform_ptr + row) * s
    token = _draw(base, vocab, start, acc, inv_t, m, target, best_idx, greedy, offs, BLOCK)
    chosen = tl.load(base + token).to(tl.float32) * inv_t - lse
    tl.store(out_ptr + row * stride_out, token.to(tl.float64))
    tl.store(out_ptr + row * stride_out + 1, chosen.to(tl.float64))
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["chunks", "chunk_len"])
def _sample_kernel(
    logits_ptr, stride, vocab, inv_temp_ptr, uniform_ptr, greedy_ptr,
    out_ptr, stride_out, lse_ptr, part_ptr, counter_ptr, chunks, chunk_len,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = logits_ptr + row * stride
    inv_t = tl.load(inv_temp_ptr + row)
    greedy = tl.load(greedy_ptr + row) != 0
    offs = tl.arange(0, BLOCK)
    lo = chunk * chunk_len
    m, s, best, best_idx = _chunk_stats(base, lo, tl.minimum(lo + chunk_len, vocab), inv_t, offs, BLOCK)
    if chunks == 1:
        _finish(base, vocab, row, inv_t, greedy, m, s, best_idx, tl.zeros((), tl.int64), tl.zeros((), tl.float32),
                uniform_ptr, out_ptr, stride_out, lse_ptr, offs, BLOCK)
    else:
        part = part_ptr + (row * chunks + chunk) * 4
        tl.store(part, m)
        tl.store(part + 1, s)
        tl.store(part + 2, best)
        tl.store(part + 3, best_idx.to(tl.float32))  # < 2^24: exact
        tl.debug_barrier()  # every partial store precedes the release below
        ticket = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
        if ticket == chunks - 1:  # the row's last program: combine the chunks in order (deterministic)
            tl.store(counter_ptr + row, 0)  # ready for the next launch (graph replay)
            tl.debug_barrier()
            first = part_ptr + row * chunks * 4
            m = tl.full((), float("-inf"), tl.float32)
            best = tl.full((), float("-inf"), tl.float32)
            best_idx = tl.zeros((), tl.int64)
            for c in range(chunks):  # .cg: read at L2, where the other programs stored
                m = tl.maximum(m, tl.load(first + c * 4, cache_modifier=".cg"))
                best_c = tl.load(first + c * 4 + 2, cache_modifier=".cg")
                better = best_c > best
                best_idx = tl.where(better, tl.load(first + c * 4 + 3, cache_modifier=".cg").to(tl.int64), best_idx)
                best = tl.maximum(best, best_c)
            s = tl.zeros((), tl.float32)
            for c in range(chunks):
                s += tl.load(first + c * 4 + 1, cache_modifier=".cg") * tl.exp(
                    tl.load(first + c * 4, cache_modifier=".cg") - m)
            # the draw starts at the first chunk whose mass reaches the target (the last with mass if rounding
            # leaves every chunk short), with the mass before it
            target = tl.load(uniform_ptr + row) * s
            before = tl.zeros((), tl.float32)
            start = tl.full((), -1, tl.int64)
            acc = tl.zeros((), tl.float32)
            last_start = tl.zeros((), tl.int64)
            last_acc = tl.zeros((), tl.float32)
            for c in range(chunks):
                mass = tl.load(first + c * 4 + 1, cache_modifier=".cg") * tl.exp(
                    tl.load(first + c * 4, cache_modifier=".cg") - m)
                hit = (start < 0) & (before + mass >= target)
                start = tl.where(hit, c * chunk_len, start)
                acc = tl.where(hit, before, acc)
                last_start = tl.where(mass > 0, c * chunk_len, last_start)
                last_acc = tl.where(mass > 0, before, last_acc)
                before += mass
            acc = tl.where(start < 0, last_acc, acc)
            start = tl.where(start < 0, last_start, start)
            _finish(base, vocab, row, inv_t, greedy, m, s, best_idx, start, acc, uniform_ptr, out_ptr, stride_out,
                    lse_ptr, offs, BLOCK)


def default_chunks(rows: int, vocab: int, block: int, device: torch.device) -> int:
    """Programs per row: about two per SM over the batch, each at least a few blocks long, at most 32."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    chunks = min(32, max(1, triton.cdiv(2 * sms, max(rows, 1))), max(1, vocab // (4 * block)))
    return triton.cdiv(vocab, triton.cdiv(triton.cdiv(vocab, chunks), block) * block)


def _check(logits: torch.Tensor, inv_temperature: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [B, V] with contiguous rows, got {tuple(logits.shape)}")
    rows = logits.shape[0]
    for name, t in (("inv_temperature", inv_temperature), ("uniform", uniform), ("greedy", greedy)):
        if t.shape != (rows,) or t.device != logits.device:
            raise ValueError(f"{name} must be [{rows}] on {logits.device}, got {tuple(t.shape)} on {t.device}")


def _launch(logits: torch.Tensor, inv_temperature: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor,
            out: torch.Tensor, block: int, num_warps: int, chunks: int | None) -> torch.Tensor:
    """Token ids and log-probs into out[:, 0] / out[:, 1] (float64); returns the log-sum-exp [B] float32."""
    rows, vocab = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(block, triton.next_power_of_2(vocab))
        if chunks is None:
            chunks = default_chunks(rows, vocab, block, logits.device)
        chunk_len = triton.cdiv(triton.cdiv(vocab, chunks), block) * block
        chunks = triton.cdiv(vocab, chunk_len)  # no empty chunk
        part, counters = workspace(logits.device, rows * chunks * 4, rows)  # the GEMM's: calls run in stream order
        _sample_kernel[(rows, chunks)](
            logits, logits.stride(0), vocab, inv_temperature.float().contiguous(),
            uniform.float().contiguous(), greedy.to(torch.int32),
            out, out.stride(0), lse, part, counters, chunks, chunk_len, BLOCK=block, num_warps=num_warps,
        )
    return lse


def sample(logits: torch.Tensor, inv_temperature: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor,
           block: int = 4096, num_warps: int = 8, chunks: int | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [B] int64, their log-probs [B] float32, log-sum-exp of logits * inv_temperature [B] float32) for
    logits [B, V] (rows contiguous), inv_temperature / uniform [B] float32 (u in (0, 1]), greedy [B] (nonzero: take
    the argmax; pass inv_temperature 1 for those rows). Each row is read by `chunks` programs (None: enough to fill
    the GPU)."""
    _check(logits, inv_temperature, uniform, greedy)
    out = torch.empty(logits.shape[0], 2, dtype=torch.float64, device=logits.device)
    lse = _launch(logits, inv_temperature, uniform, greedy, out, block, num_warps, chunks)
    return out[:, 0].long(), out[:, 1].float(), lse


def sample_packed(logits: torch.Tensor, inv_temperature: torch.Tensor, uniform: torch.Tensor, greedy: torch.Tensor,
                  topk: int, extra: tuple[torch.Tensor, ...] = (), out: torch.Tensor | None = None) -> torch.Tensor:
    """`sample`, packed for one device-to-host copy: float64 [B, 2 + len(extra) + 2 topk] = token id, its log-prob,
    the `extra` [B] columns, the top-k ids and their log-probs (float64 holds every id exactly). The kernel writes
    the first two columns itself; out: the buffer to fill (a new one when None)."""
    _check(logits, inv_temperature, uniform, greedy)
    rows, first = logits.shape[0], 2 + len(extra)
    shape = (rows, first + 2 * topk)
    if out is not None and (out.shape != shape or out.dtype != torch.float64 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float64 {shape}, got {tuple(out.shape)} {out.dtype}")
    packed = torch.empty(shape, dtype=torch.float64, device=logits.device) if out is None else out
    lse = _launch(logits, inv_temperature, uniform, greedy, packed, 4096, 8, None)
    if extra:
        packed[:, 2:first] = torch.stack(extra, dim=1)
    if topk:
        top_vals, top_ids = logits.float().topk(topk, dim=-1)  # the order of logits * inv_temperature too
        packed[:, first : first + topk] = top_ids
        packed[:, first + topk :] = top_vals * inv_temperature[:, None] - lse[:, None]
    return packed
