"""Attention-only decode benchmark: dense FlashInfer vs the block-sparse step at Qwen3 attention shapes.

One layer's decode step for `batch` requests of `context` tokens each (bf16, page size 16, HND cache, pages
scattered at random over a shared pool). Sparse step = summary update (one token per request) + Triton selection
(scores + top-k in one launch, writing FlashInfer's per-KV-head page lists) + FlashInfer decode over the selected
pages; `*_2launch` columns: the same step with the phase-3 two-launch selection, timed in the same run. Each part
is timed alone and the whole step eagerly and as one CUDA graph (the engine's setting), with a cold L2 each run.

Bytes floor = (selected KV + page summaries) / device-to-device copy bandwidth measured in the same run.
    python -m bench.attention                       # Qwen3-4B grid + a 1.7B/14B slice
    python -m bench.attention --models qwen3-4b --contexts 8k,32k --batches 8 --budgets 1024
"""

from __future__ import annotations

import argparse
import math

import torch

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

MODELS = {  # q heads, kv heads, head dim (Qwen3-8B has the 4B's attention shape)
    "qwen3-1.7b": (16, 8, 128),
    "qwen3-4b": (32, 8, 128),
    "qwen3-8b": (32, 8, 128),
    "qwen3-14b": (40, 8, 128),
}
PAGE = 16
KV_BYTES = 2  # bf16


class KVPool:
    """Random bf16 K/V pages [pages, kv_heads, page, dim] with their centroid summaries (key sum fp32 + count)."""

    def __init__(self, tokens: int, kv_heads: int, head_dim: int, seed: int = 0) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.pages = math.ceil(tokens / PAGE)
        shape = (self.pages, kv_heads, PAGE, head_dim)
        self.k = torch.randn(shape, dtype=torch.bfloat16, device="cuda", generator=gen)
        self.v = torch.randn(shape, dtype=torch.bfloat16, device="cuda", generator=gen)
        self.key_sum = torch.empty(self.pages, kv_heads, head_dim, dtype=torch.float32, device="cuda")
        for s in range(0, self.pages, 65536):
            self.key_sum[s : s + 65536] = self.k[s : s + 65536].float().sum(2)
        self.count = torch.full((self.pages,), PAGE, dtype=torch.int32, device="cuda")
        self.gen = gen

    def block_table(self, batch: int, n_pages: int) -> torch.Tensor:
        perm = torch.randperm(self.pages, device="cuda", generator=self.gen)[: batch * n_pages]
        return perm.view(batch, n_pages).to(torch.int32)


class SparseStep:
    """Buffers and callables of one block-sparse decode step (shapes fixed, so it can be graph-captured)."""

    def __init__(self, pool: KVPool, q: torch.Tensor, block_table: torch.Tensor, context: int, budget: int,
                 scorer: str = "centroid", key_sum: torch.Tensor | None = None, count=True) -> None:
        from sparrow_sgl.attention.kernels.flashinfer_decode import FlashInferSparseDecoder
        from sparrow_sgl.attention.pages import PageSummaries
        from sparrow_sgl.config import SparsityConfig

        batch, q_heads, head_dim = q.shape
        kv_heads = pool.k.shape[1]
        self.cfg = SparsityConfig(page_size=PAGE, kv_layout="HND", scorer=scorer)
        self.pool, self.q, self.block_table = pool, q, block_table
        self.budget_pages = budget // PAGE
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        self.limit = torch.full((batch,), self.budget_pages, dtype=torch.int32, device="cuda")
        self.pages = torch.empty(batch, kv_heads, self.budget_pages, dtype=torch.int32, device="cuda")
        self.scores = torch.empty(batch, kv_heads, block_table.shape[1], dtype=torch.float32, device="cuda")
        self.counters = torch.zeros(batch * kv_heads, dtype=torch.int32, device="cuda")
        self.one_launch = True  # False: the phase-3 two-launch selection (before/after in one run)
        self.tiling: dict = {}  # pages_per_prog / block_p / num_warps overrides of the scoring tile
        self.out = torch.empty_like(q)
        self.decoder = FlashInferSparseDecoder(batch, kv_heads, q_heads, head_dim, PAGE, self.budget_pages,
                                               torch.bfloat16, "cuda", use_cuda_graph=True)
        self.decoder.plan(self.limit)
        key_sum = pool.key_sum if key_sum is None else key_sum
        self.summaries = PageSummaries(key_sum=key_sum, count=pool.count, key_min=key_sum, key_max=key_sum)
        self.count = pool.count if count else None
        # the update always runs on float32 summaries (min/max too for quest; aliased to the sum: same bytes)
        self.updated = PageSummaries(key_sum=pool.key_sum, count=pool.count, key_min=pool.key_sum,
                                     key_max=pool.key_sum)
        # this step's keys land in each request's last page (not its first token: no page restart)
        self.new_pages = block_table[:, -1].contiguous()
        self.new_offsets = ((self.seq_lens - 1) % PAGE).contiguous()
        self.new_keys = torch.randn(batch, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")

    def select(self) -> None:
        from sparrow_sgl.attention.kernels.triton_select import select_pages_into

        select_pages_into(self.q, self.block_table, self.seq_lens, self.limit, self.cfg, self.pages,
                          key_sum=self.summaries.key_sum, count=self.count, key_min=self.summaries.key_min,
                          key_max=self.summaries.key_max, scores=self.scores, counters=self.counters,
                          csr=self.decoder.csr, one_launch=self.one_launch, **self.tiling)

    def select_two_launches(self) -> None:
        one_launch, self.one_launch = self.one_launch, False
        try:
            self.select()
        finally:
            self.one_launch = one_launch

    def step_two_launches(self) -> torch.Tensor:
        self.update()
        self.select_two_launches()
        return self.attend()

    def score_only(self) -> None:
        from sparrow_sgl.attention.kernels.triton_select import select_pages_into

        select_pages_into(self.q, self.block_table, self.seq_lens, self.limit, self.cfg, self.pages,
                          key_sum=self.summaries.key_sum, count=self.count, key_min=self.summaries.key_min,
                          key_max=self.summaries.key_max, scores=self.scores, topk=False, one_launch=False,
                          **self.tiling)

    def update(self) -> None:
        from sparrow_sgl.attention.kernels.triton_summaries import append_decode

        append_decode(self.updated, self.new_pages, self.new_offsets, self.new_keys, minmax=self.cfg.scorer == "quest")

    def attend(self) -> torch.Tensor:
        return self.decoder.run(self.q, self.pool.k, self.pool.v, out=self.out)

    def attend_triton(self) -> torch.Tensor:
        from sparrow_sgl.attention.kernels.triton_decode import triton_attend_pages

        counts = self.limit[:, None].expand(-1, self.pages.shape[1])
        return triton_attend_pages(self.q, self.pool.k, self.pool.v, self.block_table, self.seq_lens, self.pages,
                                   counts, self.cfg)

    def step(self) -> torch.Tensor:
        self.update()
        self.select()
        return self.attend()


def summary_bytes(batch: int, kv_heads: int, head_dim: int, n_pages: int, sum_bytes: int = 4) -> int:
    """Centroid scoring reads each page's key sum per KV head and its token count."""
    return batch * n_pages * (kv_heads * head_dim * sum_bytes + 4)


def dense_row(pool, q, block_table, context, bw, reps) -> dict:
    from sparrow_sgl.attention.kernels.flashinfer_decode import FlashInferDenseDecoder

    batch, q_heads, head_dim = q.shape
    kv_heads = pool.k.shape[1]
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    dec = FlashInferDenseDecoder("HND", q_heads // kv_heads, "cuda", use_cuda_graph=True, batch=batch,
                                 max_pages=block_table.numel())
    dec.plan(block_table, seq_lens, q_heads, kv_heads, head_dim, PAGE, torch.bfloat16)
    run = lambda: dec.run(q, pool.k, pool.v)
    t = time_us(run, reps)["median_us"]
    tg = graph_time_us(run, reps)["median_us"]
    kv = batch * context * kv_heads * head_dim * 2 * KV_BYTES
    return {"budget": None, "dense_us": t, "dense_graph_us": tg, "kv_bytes": kv, "floor_us": round(kv / bw / 1e3, 2),
            "dense_gbs": round(kv / tg / 1e3, 1), "dense_ratio_to_copy": round(kv / tg / 1e3 / bw, 3)}


def sparse_row(pool, q, block_table, context, budget, bw, reps, triton_decode: bool, dense_graph_us: float) -> dict:
    batch, q_heads, head_dim = q.shape
    kv_heads = pool.k.shape[1]
    step = SparseStep(pool, q, block_table, context, budget)
    step.select()
    ref = step.attend_triton() if triton_decode else None
    out = step.attend()
    row = {"budget": budget}
    if ref is not None:
        row["fi_vs_triton_rel_err"] = float((out.float() - ref.float()).norm() / ref.float().norm())
    parts = {"select": step.select, "score": step.score_only, "update": step.update, "attn": step.attend,
             "step": step.step, "select_2launch": step.select_two_launches, "step_2launch": step.step_two_launches}
    for name, fn in parts.items():
        row[f"{name}_us"] = time_us(fn, reps)["median_us"]
        row[f"{name}_graph_us"] = graph_time_us(fn, reps)["median_us"]
    if triton_decode:  # the Triton fallback in place of FlashInfer, same selection
        row["attn_triton_us"] = time_us(step.attend_triton, reps)["median_us"]
        row["attn_triton_graph_us"] = graph_time_us(step.attend_triton, reps)["median_us"]
        row["step_triton_graph_us"] = graph_time_us(lambda: (step.update(), step.select(), step.attend_triton()),
                                                    reps)["median_us"]
        row["step_triton_2launch_graph_us"] = graph_time_us(
            lambda: (step.update(), step.select_two_launches(), step.attend_triton()), reps)["median_us"]
    n_pages = context // PAGE
    kv_sel = batch * budget * kv_heads * head_dim * 2 * KV_BYTES
    summ = summary_bytes(batch, kv_heads, head_dim, n_pages)
    floor_us = (kv_sel + summ) / bw / 1e3
    t_step = row["step_graph_us"]
    row |= {
        "kv_bytes": kv_sel, "summary_bytes": summ, "floor_us": round(floor_us, 2),
        "attn_gbs": round(kv_sel / row["attn_graph_us"] / 1e3, 1),
        "attn_ratio_to_copy": round(kv_sel / row["attn_graph_us"] / 1e3 / bw, 3),
        "attn_over_kv_floor": round(row["attn_graph_us"] / (kv_sel / bw / 1e3), 3),
        "step_gbs": round((kv_sel + summ) / t_step / 1e3, 1),
        "step_over_floor": round(t_step / floor_us, 3),
        "step_eager_over_floor": round(row["step_us"] / floor_us, 3),
        "selection_share": round((row["select_graph_us"] + row["update_graph_us"]) / t_step, 3),
        "selection_share_2launch": round((row["select_2launch_graph_us"] + row["update_graph_us"])
                                         / row["step_2launch_graph_us"], 3),
        "selection_share_bytes_bound": round(summ / (summ + kv_sel), 3),
        "step_2launch_over_floor": round(row["step_2launch_graph_us"] / floor_us, 3),
        "speedup_vs_dense": round(dense_graph_us / t_step, 2),
        "dense_graph_us": dense_graph_us,
    }
    if triton_decode:
        row["attn_triton_over_kv_floor"] = round(row["attn_triton_graph_us"] / (kv_sel / bw / 1e3), 3)
        row["step_triton_over_floor"] = round(row["step_triton_graph_us"] / floor_us, 3)
        row["step_triton_2launch_over_floor"] = round(row["step_triton_2launch_graph_us"] / floor_us, 3)
    return row


def run_model(pool, model, contexts, batches, budgets, bw, reps, triton_decode, out_dir=None) -> list[dict]:
    q_heads, kv_heads, head_dim = MODELS[model]
    rows = []
    for context in contexts:
        for batch in batches:
            if batch * context > pool.pages * PAGE:
                continue
            block_table = pool.block_table(batch, context // PAGE)
            q = torch.randn(batch, q_heads, head_dim, dtype=torch.bfloat16, device="cuda")
            base = {"model": model, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
                    "context": context, "batch": batch}
            dense = dense_row(pool, q, block_table, context, bw, reps)
            rows.append(base | dense)
            progress("attention", rows[-1], out_dir)
            for budget in budgets:
                if budget < context:
                    sparse = sparse_row(pool, q, block_table, context, budget, bw, reps, triton_decode,
                                        dense["dense_graph_us"])
                    rows.append(base | sparse)
                    progress("attention", rows[-1], out_dir)
                    print(f"{model} ctx {context} batch {batch} budget {budget}: step {sparse['step_graph_us']} us, "
                          f"{sparse['step_over_floor']}x floor, dense {dense['dense_graph_us']} us", flush=True)
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], bw: float) -> None:
    print(f"\ncopy bandwidth {bw} GB/s; microseconds (CUDA graph); floor = (selected KV + summaries) / copy bw")
    print(f"{'model':11} {'ctx':>6} {'B':>4} {'budget':>6} {'dense':>8} {'step':>8} {'floor':>8} {'step/fl':>7} "
          f"{'attn/kvfl':>9} {'sel%':>5} {'speedup':>7} {'tr.step':>8} {'tr/fl':>6} {'tr/fl2L':>7} {'sel%2L':>6} "
          f"{'sel%min':>7}")
    for r in rows:
        if r["budget"] is None:
            continue
        print(f"{r['model']:11} {r['context']:>6} {r['batch']:>4} {r['budget']:>6} "
              f"{r.get('dense_graph_us', 0):>8} {r['step_graph_us']:>8} {r['floor_us']:>8} {r['step_over_floor']:>7} "
              f"{r['attn_over_kv_floor']:>9} {100 * r['selection_share']:>5.1f} {r['speedup_vs_dense']:>7} "
              f"{r.get('step_triton_graph_us', '-'):>8} {r.get('step_triton_over_floor', '-'):>6} "
              f"{r.get('step_triton_2launch_over_floor', '-'):>7} {100 * r['selection_share_2launch']:>6.1f} "
              f"{100 * r['selection_share_bytes_bound']:>7.1f}")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-4b", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--budgets", default="512,1024,2048,4096,8192", help="KV budgets in tokens (incl. sink+local)")
    p.add_argument("--contexts", default="8k,16k,32k,64k", help="context lengths in tokens")
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--slice-models", default="qwen3-1.7b,qwen3-14b", help="models run on the smaller slice")
    p.add_argument("--slice", default="16k,32k/32/1024,4096", help="contexts/batches/budgets of the slice")
    p.add_argument("--reps", type=int, default=20, help="timed runs per measurement (median reported)")
    p.add_argument("--no-triton", action="store_true", help="skip timing the Triton decode fallback")
    p.add_argument("--results-dir", default=None, help="where <name>.json is appended (default bench/results)")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    args = args or build_parser().parse_args(argv)
    require_cuda()
    models = [m for m in args.models.split(",") if m]
    slice_models = [m for m in args.slice_models.split(",") if m]
    for m in models + slice_models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    contexts, batches, budgets = parse_ints(args.contexts), parse_ints(args.batches), parse_ints(args.budgets)
    s_ctx, s_batch, s_budget = (parse_ints(x) for x in args.slice.split("/"))
    bw = copy_bandwidth_gbs()
    _, kv_heads, head_dim = MODELS[(models + slice_models)[0]]
    pool = KVPool(max(max(contexts) * max(batches), max(s_ctx) * max(s_batch)), kv_heads, head_dim)
    rows = []
    for model in models:
        rows += run_model(pool, model, contexts, batches, budgets, bw, args.reps, not args.no_triton, args.results_dir)
    for model in slice_models:
        rows += run_model(pool, model, s_ctx, s_batch, s_budget, bw, args.reps, not args.no_triton, args.results_dir)
    record = {"bench": "attention", **device_info(), "copy_bw_gbs": bw, "page_size": PAGE, "dtype": "bfloat16",
              "timing": "median of reps, cold L2 each run; *_graph_us = CUDA graph replay", "rows": rows}
    emit("attention", record, args.results_dir)
    print_table(rows, bw)
    return record


if __name__ == "__main__":
    main()
