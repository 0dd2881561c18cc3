"""Selection overhead: page scoring + top-k + summary update as a share of the sparse decode step.

Qwen3-4B attention shape, page size 16, bf16 KV, CUDA-graph timings with a cold L2 each run. Variants:
- centroid_fp32: the repo's summaries (float32 key sum + count per page), the paper's centroid scorer;
- quest_fp32: Quest min/max upper bound (reads two float32 summaries per page);
- centroid_bf16: what-if, centroids kept in bf16 (no count read): half the summary bytes of centroid_fp32.
Also: the torch reference `select_pages` and `PageSummaries.append` for comparison (eager).
`select` is the one-launch selection (score + top-k fused, the engine's default); `select_2launch` / `step_2launch`
the phase-3 pair of launches, timed in the same run (before/after). `selection_share_bytes_bound` is the share the
summaries take of the step's bytes floor: the lowest selection share a bytes-bound step can have.
`--sweep` times the one-launch selection over scoring tiles (pages per program, tile rows, warps) instead.
    python -m bench.selection --contexts 8k,32k --batches 8,32 --budgets 1024
    python -m bench.selection --sweep --contexts 2k,8k,32k --batches 13,128 --budgets 1024
"""

from __future__ import annotations

import argparse

import torch

from bench.attention import MODELS, PAGE, KVPool, SparseStep, summary_bytes
from bench.common import (
    copy_bandwidth_gbs,
    device_info,
    emit,
    graph_time_us,
    parse_ints,
    progress,
    require_cuda,
    time_us,
)

VARIANTS = ("centroid_fp32", "quest_fp32", "centroid_bf16")


def _step(pool, q, block_table, context, budget, variant, bf16_centroids):
    if variant == "quest_fp32":
        return SparseStep(pool, q, block_table, context, budget, scorer="quest")
    if variant == "centroid_bf16":
        return SparseStep(pool, q, block_table, context, budget, key_sum=bf16_centroids, count=False)
    return SparseStep(pool, q, block_table, context, budget)


def torch_reference_us(pool, q, block_table, context, budget, reps) -> dict:
    """Eager torch `select_pages` and `PageSummaries.append` (decode step, one key per request)."""
    from sparrow_sgl.attention.pages import PageSummaries
    from sparrow_sgl.attention.select import select_pages
    from sparrow_sgl.config import SparsityConfig

    cfg = SparsityConfig(page_size=PAGE, kv_layout="HND")
    batch, _, head_dim = q.shape
    kv_heads = pool.k.shape[1]
    summaries = PageSummaries(key_sum=pool.key_sum, count=pool.count, key_min=pool.key_sum, key_max=pool.key_sum)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    select = lambda: select_pages(q, summaries, block_table, seq_lens, budget, cfg)
    small = PageSummaries.allocate(block_table.numel(), kv_heads, head_dim, device="cuda")
    pages = torch.arange(batch, device="cuda") * (context // PAGE)
    offsets = torch.full((batch,), 5, device="cuda")
    keys = torch.randn(batch, kv_heads, head_dim, device="cuda")
    append = lambda: small.append(pages, offsets, keys)
    return {"torch_select_us": time_us(select, reps)["median_us"],
            "torch_update_us": time_us(append, reps)["median_us"]}


def measure(pool, q, block_table, context, budget, variant, bf16_centroids, bw, reps) -> dict:
    batch, _, head_dim = q.shape
    kv_heads = pool.k.shape[1]
    step = _step(pool, q, block_table, context, budget, variant, bf16_centroids)
    row = {"variant": variant}
    for name, fn in {"score": step.score_only, "select": step.select, "update": step.update,
                     "attn": step.attend, "step": step.step, "select_2launch": step.select_two_launches,
                     "step_2launch": step.step_two_launches}.items():
        row[f"{name}_graph_us"] = graph_time_us(fn, reps)["median_us"]
    row["select_us"] = time_us(step.select, reps)["median_us"]
    n_pages = context // PAGE
    sum_bytes = {"centroid_fp32": 4, "quest_fp32": 8, "centroid_bf16": 2}[variant]
    summ = summary_bytes(batch, kv_heads, head_dim, n_pages, sum_bytes) - (batch * n_pages * 4 if variant ==
                                                                           "centroid_bf16" else 0)
    kv_sel = batch * budget * kv_heads * head_dim * 2 * 2
    sel = row["select_graph_us"] + row["update_graph_us"]
    row |= {
        "topk_graph_us": round(row["select_2launch_graph_us"] - row["score_graph_us"], 2),
        "select_over_score": round(row["select_graph_us"] / row["score_graph_us"], 3),
        "summary_bytes": summ,
        "score_gbs": round(summ / row["score_graph_us"] / 1e3, 1),
        "score_ratio_to_copy": round(summ / row["score_graph_us"] / 1e3 / bw, 3),
        "selection_share_of_parts": round(sel / (sel + row["attn_graph_us"]), 3),
        "selection_share_of_step": round(sel / row["step_graph_us"], 3),
        "selection_share_2launch": round((row["select_2launch_graph_us"] + row["update_graph_us"])
                                         / row["step_2launch_graph_us"], 3),
        "selection_share_bytes_bound": round(summ / (summ + kv_sel), 3),
        "step_2launch_over_floor": round(row["step_2launch_graph_us"] / ((summ + kv_sel) / bw / 1e3), 3),
        "summary_share_of_floor_bytes": round(summ / (summ + kv_sel), 3),
        "step_over_floor": round(row["step_graph_us"] / ((summ + kv_sel) / bw / 1e3), 3),
    }
    return row


SWEEP = [(ppp, bp, w) for ppp in (32, 64, 128, 256) for bp in (16, 32, 64, 128) for w in (4, 8) if bp <= ppp]


def sweep(pool, q, block_table, context, budget, variant, bf16_centroids, bw, reps) -> list[dict]:
    """One-launch selection (and two-launch scoring alone) per scoring tile; the default tile first."""
    from sparrow_sgl.attention.kernels.triton_select import score_tiling

    batch, _, head_dim = q.shape
    kv_heads = pool.k.shape[1]
    step = _step(pool, q, block_table, context, budget, variant, bf16_centroids)
    default = score_tiling(batch * kv_heads, block_table.shape[1], q.device)
    sum_bytes = {"centroid_fp32": 4, "quest_fp32": 8, "centroid_bf16": 2}[variant]
    summ = summary_bytes(batch, kv_heads, head_dim, context // PAGE, sum_bytes) - (
        batch * (context // PAGE) * 4 if variant == "centroid_bf16" else 0)
    rows = []
    for ppp, bp, w in [default] + [c for c in SWEEP if c != default]:
        step.tiling = {"pages_per_prog": ppp, "block_p": bp, "num_warps": w}
        select_us = graph_time_us(step.select, reps)["median_us"]
        score_us = graph_time_us(step.score_only, reps)["median_us"]
        rows.append({"variant": variant, "pages_per_prog": ppp, "block_p": bp, "num_warps": w,
                     "default": (ppp, bp, w) == default, "select_graph_us": select_us, "score_graph_us": score_us,
                     "summary_bytes": summ, "select_gbs": round(summ / select_us / 1e3, 1),
                     "score_ratio_to_copy": round(summ / score_us / 1e3 / bw, 3)})
    return rows


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-4b", choices=sorted(MODELS))
    p.add_argument("--budgets", default="1024,4096")
    p.add_argument("--contexts", default="8k,32k,64k")
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--torch-max-batch", type=int, default=32, help="time the torch reference up to this batch")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sweep", action="store_true", help="time scoring tiles of the one-launch selection instead")
    p.add_argument("--results-dir", default=None)
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    args = args or build_parser().parse_args(argv)
    require_cuda()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    q_heads, kv_heads, head_dim = MODELS[args.model]
    contexts, batches, budgets = parse_ints(args.contexts), parse_ints(args.batches), parse_ints(args.budgets)
    bw = copy_bandwidth_gbs()
    pool = KVPool(max(contexts) * max(batches), kv_heads, head_dim)
    bf16_centroids = (pool.key_sum / PAGE).to(torch.bfloat16) if "centroid_bf16" in variants else None
    rows = []
    for context in contexts:
        for batch in batches:
            block_table = pool.block_table(batch, context // PAGE)
            q = torch.randn(batch, q_heads, head_dim, dtype=torch.bfloat16, device="cuda")
            for budget in (b for b in budgets if b < context):
                base = {"model": args.model, "context": context, "batch": batch, "budget": budget}
                if args.sweep:
                    for variant in variants:
                        rows += [base | r for r in sweep(pool, q, block_table, context, budget, variant,
                                                         bf16_centroids, bw, args.reps)]
                        tiles = rows[-len(SWEEP) - 1 :]
                        best = min(tiles, key=lambda r: r["select_graph_us"])
                        print(f"sweep ctx {context} B {batch} {variant}: default {tiles[0]['select_graph_us']}"
                              f" us, best {best['select_graph_us']} us at {best['pages_per_prog']}/{best['block_p']}/"
                              f"{best['num_warps']}", flush=True)
                    continue
                if batch <= args.torch_max_batch:
                    rows.append(base | {"variant": "torch_reference"} |
                                torch_reference_us(pool, q, block_table, context, budget, args.reps))
                for variant in variants:
                    rows.append(base | measure(pool, q, block_table, context, budget, variant, bf16_centroids, bw,
                                               args.reps))
                    progress("selection", rows[-1], args.results_dir)
            torch.cuda.empty_cache()
    record = {"bench": "selection_sweep" if args.sweep else "selection", **device_info(), "copy_bw_gbs": bw,
              "page_size": PAGE, "rows": rows}
    emit("selection", record, args.results_dir)
    if args.sweep:
        return record
    print(f"\ncopy bandwidth {bw} GB/s; microseconds, CUDA graph; share = (select + update) / step")
    print(f"{'ctx':>6} {'B':>4} {'budget':>6} {'variant':14} {'score':>7} {'topk':>7} {'update':>7} {'attn':>7} "
          f"{'step':>7} {'share':>6} {'scoreGB/s':>9} {'select':>7} {'sel2L':>7} {'step2L':>7} {'share2L':>7} "
          f"{'minshare':>8}")
    for r in rows:
        if r["variant"] == "torch_reference":
            print(f"{r['context']:>6} {r['batch']:>4} {r['budget']:>6} torch_ref      select {r['torch_select_us']} "
                  f"update {r['torch_update_us']} (eager)")
            continue
        print(f"{r['context']:>6} {r['batch']:>4} {r['budget']:>6} {r['variant']:14} {r['score_graph_us']:>7} "
              f"{r['topk_graph_us']:>7} {r['update_graph_us']:>7} {r['attn_graph_us']:>7} {r['step_graph_us']:>7} "
              f"{r['selection_share_of_step']:>6} {r['score_gbs']:>9} {r['select_graph_us']:>7} "
              f"{r['select_2launch_graph_us']:>7} {r['step_2launch_graph_us']:>7} {r['selection_share_2launch']:>7} "
              f"{r['selection_share_bytes_bound']:>8}")
    return record


if __name__ == "__main__":
    main()
