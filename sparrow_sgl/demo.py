"""`sparrow demo` (foundation form): per-bin acceptance-rate tails of sparse vs dense attention on a tiny model.

A tiny random Qwen3 teacher-forces one long sequence densely and with sparse decode attention at several fixed
budgets; the per-token acceptance rate against the dense distribution is binned by position and its 5th percentile
printed per bin. Random weights are sharpened (q/k norm gains) so attention is peaked enough for sparsity to matter.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from sparrow_sgl.attention.teacher_forced import sparse_causal_attention
from sparrow_sgl.config import SparsityConfig
from sparrow_sgl.mismatch import acceptance_rate, min_tail, tail_by_bin

ATTN_NAME = "sparrow_teacher_forced"
_active: dict = {}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=2048, help="tokens in the teacher-forced sequence")
    p.add_argument("--prompt-len", type=int, default=256, help="leading tokens attended densely (prefill)")
    p.add_argument("--budgets", default="64,128,256,512", help="comma-separated KV budgets in tokens")
    p.add_argument("--bin-tokens", type=int, default=512, help="position bin width in tokens")
    p.add_argument("--tau", type=float, default=0.86, help="tail threshold drawn in the table")
    p.add_argument("--sharpen", type=float, default=4.0, help="gain applied to q/k norms of the random model")
    p.add_argument("--seed", type=int, default=0)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention hook: [B, H, T, D] inputs → [B, T, H, D] output, sparse per position."""
    cfg, budgets = _active["cfg"], _active["budgets"]
    if cfg.is_dense_layer(module.layer_idx):
        groups = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), is_causal=True, scale=scaling
        )
        return out.transpose(1, 2), None
    outs = [
        sparse_causal_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), budgets, cfg, layer=module.layer_idx, scale=scaling
        )
        for q, k, v in zip(query, key, value)
    ]
    return torch.stack(outs), None


@contextlib.contextmanager
def sparse_attention(model, cfg: SparsityConfig, budgets: torch.Tensor):
    """Run `model` (a transformers Qwen3) with position-wise sparse attention inside the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _attention)
    previous = model.config._attn_implementation
    _active.update(cfg=cfg, budgets=budgets)
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        _active.clear()


def _build_model(args):
    from sparrow_sgl.tiny import TinyModelSpec, build_tiny_model

    model = build_tiny_model(TinyModelSpec(seed=args.seed, max_position_embeddings=max(32768, args.seq_len)))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(args.sharpen)
            layer.self_attn.k_norm.weight.mul_(args.sharpen)
    return model


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    torch.manual_seed(args.seed)
    budgets = [int(b) for b in args.budgets.split(",")]
    cfg = SparsityConfig()
    model = _build_model(args)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len))
    t0 = time.perf_counter()
    with torch.no_grad():
        logp_dense = model(ids).logits[0].float().log_softmax(-1)
    positions = torch.arange(args.prompt_len, args.seq_len)
    results = {}
    for budget in budgets:
        per_position = torch.full((args.seq_len,), budget)
        per_position[: args.prompt_len] = -1  # prefill is dense
        with torch.no_grad(), sparse_attention(model, cfg, per_position):
            logp_sparse = model(ids).logits[0].float().log_softmax(-1)
        alpha = acceptance_rate(logp_dense[positions], logp_sparse[positions])
        results[budget] = tail_by_bin(alpha, positions, bin_tokens=args.bin_tokens)
        console.print(f"budget {budget} tokens: done ({time.perf_counter() - t0:.1f} s elapsed)")
    table = Table(title=f"5th-percentile acceptance rate per {args.bin_tokens}-token bin (tau = {args.tau})")
    table.add_column("budget (tokens)")
    n_bins = len(next(iter(results.values())))
    for i in range(n_bins):
        table.add_column(f"{i * args.bin_tokens}-{(i + 1) * args.bin_tokens} tok")
    table.add_column("min tail >= tau")
    for budget, stats in results.items():
        cells = ["-" if s.tail is None else f"{s.tail:.4f}" for s in stats]
        lowest = min_tail(stats)
        table.add_row(str(budget), *cells, "yes" if lowest is not None and lowest >= args.tau else "no")
    console.print(table)
    console.print(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0
