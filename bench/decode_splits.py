"""The decode kernel's split plan, measured: one attention layer's Triton decode (+ split merge) at forced splits.

    python -m bench.decode_splits [--models qwen3-1.7b,qwen3-4b,qwen3-8b --entries 48,96,2048 --splits 1,2,3,5
                                   --live 16,12,8]

Each (request, KV head) row runs `splits` programs, so a launch has live rows x splits real programs; the GPU holds
only so many at once (`resident`: SMs x programs per SM of the compiled kernel), and a last, part-filled wave of
long programs leaves most of the DRAM idle (NOTES.md, session 17: 3 splits of 200 rows made the 4B dense step 27%
slower than 5). This times the kernel at the engine's decode shapes: the live batch of the benchmark (34 / 25 / 24
requests, padded to the graph's 64 / 32 / 32 rows; padding rows attend one page, as in a captured step), every live
row attending `entries` pages (a sparse budget or a dense row) scattered over a pool, for each forced split count.
Two KV pools alternate in the captured chain so no launch reads what the previous one left in L2. Prints one JSON
line per (model, entries, splits): microseconds per layer, the bytes floor at the copy bandwidth, and the split
count the engine's plan (`triton_decode.plan_splits`) picks there; then the compiled kernels' resources. `--live`
also times smaller live batches (a drained rollout's), padded as the engine pads them.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.common import copy_bandwidth_gbs, device_info, graph_time_us, parse_ints, require_cuda
from bench.kernel_resources import compiled_resources

# model: (live requests of the benchmark's batch, q heads, KV heads); head_dim 128, bf16, 16-token pages
SHAPES = {"qwen3-1.7b": (34, 16, 8), "qwen3-4b": (25, 32, 8), "qwen3-8b": (24, 32, 8)}
PAGE, HEAD_DIM = 16, 128


def problem(model: str, entries: int, device: str = "cuda", live: int | None = None) -> dict:
    """Inputs of one layer's decode at `model`'s batch (or `live` requests in the engine's padded batch), every live
    row attending `entries` pages (two KV pools)."""
    from sparrow_sgl.engine.cuda_graph import padded_batch

    live_default, q_heads, kv_heads = SHAPES[model]
    live = live or live_default
    rows = padded_batch(live)  # the engine's graph batch (powers of two by default)
    pool = live * entries + 1  # page 0: the padding rows' page
    perm = torch.randperm(pool - 1, device=device).int() + 1
    block_table = torch.zeros(rows, entries, dtype=torch.int32, device=device)
    block_table[:live] = perm.view(live, entries)
    seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
    seq_lens[:live] = entries * PAGE
    counts = torch.ones(rows, 1, dtype=torch.int32, device=device)
    counts[:live] = entries
    pages = torch.arange(entries, dtype=torch.int32, device=device)[None, None, :].expand(rows, 1, entries)
    caches = [torch.randn(pool, PAGE, kv_heads, HEAD_DIM, dtype=torch.bfloat16, device=device) for _ in range(4)]
    q = torch.randn(rows, q_heads, HEAD_DIM, dtype=torch.bfloat16, device=device)
    kv_bytes = 2 * live * entries * PAGE * kv_heads * HEAD_DIM * 2
    return dict(q=q, caches=caches, block_table=block_table, seq_lens=seq_lens, pages=pages, counts=counts,
                kv_bytes=kv_bytes)


def time_layer_us(p: dict, splits: int, chain: int = 8) -> float:
    """Microseconds per layer of `chain` decode layers captured in one graph, pools alternating."""
    from sparrow_sgl.attention.kernels.triton_decode import triton_attend_pages
    from sparrow_sgl.config import SparsityConfig

    cfg = SparsityConfig(page_size=PAGE)
    k0, v0, k1, v1 = p["caches"]
    out = torch.empty_like(p["q"])

    def layers() -> None:
        for i in range(chain):
            k, v = (k0, v0) if i % 2 == 0 else (k1, v1)
            triton_attend_pages(p["q"], k, v, p["block_table"], p["seq_lens"], p["pages"], p["counts"], cfg,
                                out=out, splits=splits)

    return graph_time_us(layers, reps=10, warmup=2, flush=False)["median_us"] / chain


def planned_splits(model: str, live: int, entries: int) -> int:
    """The engine's split count for this problem (`cuda_graph.decode_splits`, a dense row of `entries` pages)."""
    from sparrow_sgl.attention.kernels.triton_decode import num_sms
    from sparrow_sgl.engine.cuda_graph import decode_splits

    return decode_splits(live, SHAPES[model][2], entries, None, PAGE, num_sms(torch.device("cuda")))[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--entries", default="48,96,192,384,512,1024,2048", help="pages each live row attends")
    ap.add_argument("--splits", default="1,2,3,4,5,6,7,8,9,10,12,14,16")
    ap.add_argument("--live", default="", help="live requests to time besides each model's batch, e.g. 16,12,8")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SHAPES]
    entries, splits = parse_ints(args.entries), parse_ints(args.splits)
    lives = parse_ints(args.live) if args.live.strip() else []
    if unknown or not models or min(entries) < 1 or min(splits) < 1 or min(lives, default=1) < 1:
        ap.error(f"--models from {sorted(SHAPES)} (unknown: {unknown}); --entries, --splits and --live must be >= 1")
    require_cuda()
    bw = copy_bandwidth_gbs()
    print(json.dumps({"bench": "decode_splits", **device_info(), "copy_bw_gbs": bw}), flush=True)
    for model in models:
        for live in [SHAPES[model][0], *lives]:
            for n in entries:
                p = problem(model, n, live=live)
                planned = planned_splits(model, live, n)
                for s in splits:
                    us = time_layer_us(p, s)
                    print(json.dumps({"bench": "decode_splits", "model": model, "live": live, "entries": n,
                                      "splits": s, "us": round(us, 2), "floor_us": round(p["kv_bytes"] / bw / 1e3, 2),
                                      "planned": planned}), flush=True)
                del p
                torch.cuda.empty_cache()
    from sparrow_sgl.attention.kernels import triton_decode

    for row in compiled_resources(triton_decode._sparse_decode_kernel):
        print(json.dumps({"bench": "decode_splits", "resources": row}), flush=True)


if __name__ == "__main__":
    main()
