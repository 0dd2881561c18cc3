"""End-to-end decode step of full Qwen3-shaped models (random bf16 weights) through the engine's CUDA-graph step.

For each model (shapes from the cost model's Qwen3 presets) the KV pool holds `batch` requests of up to
`--max-context` tokens each (random K/V, each request on its own pages: no page is shared between requests), the
largest batch that fits next to the weights. The engine's graph-captured decode step (`engine/cuda_graph.py`, with
the fused elementwise kernels of `engine/fused.py`, its default on CUDA) is timed (CUDA-graph replay, median) at
sampled contexts for the dense schedule and the paper preset `qwen3-*-0.86`, in several variants (FlashInfer or
Triton attention; float32 key sums or a bf16 centroid copy for page scoring). `--unfused` re-times some variants
with SPARROW_FUSED_OPS=0 (the unfused torch elementwise ops of the phase-2 engine): before/after on one machine.
Step times are integrated over a rollout whose sequences grow from 1 to `--max-context` tokens -> rollout speedup,
printed next to the bytes-limit speedup of the cost model (weights + KV + summaries) and their ratio. Rows go to
`bench/results/decode_e2e.json` (a flat JSON list) in the cost model's `decode_step` format (the fastest dense
variant, the baseline, the sparse variant the engine ships, `SHIPPED_SPARSE`, and the engine under the centroid-bf16
scorer, each sparse row tagged with its `scorer`; earlier `decode_step` rows of the same model, GPU, batch and scorer
become `decode_step_superseded`), plus one `decode_rollout` summary row per model and variant.

    python -m bench.decode_e2e                                  # 1.7B, 4B, 8B, contexts 1K..32K
    python -m bench.decode_e2e --models qwen3-1.7b --contexts 2k,16k,32k --reps 5
    python -m bench.decode_e2e --profile --drain --presets 0.86,0.80   # + kernel classes, drained rollouts

`--profile` adds the kernel time of each step by class (`bench/decode_profile.py`, -> decode_profile.json),
`--drain` the drained rollout of lengths uniform in 1K-32K next to the growing-together one (`bench/decode_drain.py`),
`--env-variants` re-times variants with kernel settings (environment variables read when graphs are captured).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.common import copy_bandwidth_gbs, device_info, parse_ints, require_cuda, results_dir, time_us
from sparrow_sgl.config import Schedule
from sparrow_sgl.jsonio import write_json_atomic

PAGE = 16
GIB = 2**30
DEFAULT_CONTEXTS = "1k," + ",".join(f"{k}k" for k in range(2, 33, 2))
# name -> (dense-layer backend, sparse-layer backend, bf16 centroid copy, one-launch selection). The sparse step's
# dense layers run the engine's default (Triton): on an H200 FlashInfer (CUDA cores for group 4) read their KV at
# ~0.6 of the bytes floor, Triton at ~0.96 (issue 19; tensor cores, the FlashInfer default since session 8, are level
# with Triton); `+fidense` keeps the phase-2..4 choice (FlashInfer for them) as a what-if.
SPARSE_VARIANTS = {
    "sparse-fi": ("flashinfer", "flashinfer", False, False),
    "sparse-triton": ("triton", "triton", False, False),
    "sparse-fi-bf16c": ("flashinfer", "flashinfer", True, False),
    "sparse-triton-bf16c": ("triton", "triton", True, False),
    "sparse-triton-bf16c+fidense": ("flashinfer", "triton", True, False),  # phase-4 benchmark default: what-if
    "sparse-triton-bf16c+1launch": ("triton", "triton", True, True),  # fused score + top-k: what-if
}
DENSE_VARIANTS = {"dense-fi": "flashinfer", "dense-triton": "triton"}
UNFUSED = "+unfused"  # suffix of the variants re-timed with the unfused elementwise ops (SPARROW_FUSED_OPS=0)
WHAT_IF = ("+1launch", "+fidense")  # suffixes of what-if variants timed beside the shipped ones (never the best)
PRESET_SEP = "@"  # "sparse-triton@0.80": the variant under the model's 0.80 preset (no suffix: the first preset)
# The engine's defaults (engine/cuda_graph.py): Triton kernels, pages scored from the float32 key sums (the presets'
# "centroid" scorer). Opt-ins (the "centroid-bf16" scorer, which scores a bf16 centroid copy) are timed beside it but
# never stand for the engine, so the cost model predicts what a user runs (bench/results/NOTES.md, session 13).
SHIPPED_SPARSE = "sparse-triton"
# The engine running a "centroid-bf16" schedule: its rows are that scorer's cost-model input (`decode_step` rows
# tagged with the scorer; `MeasuredCost` keeps one scorer's sparse rows).
SHIPPED_BF16_SCORER = "sparse-triton-bf16c"


def with_scorer(schedule: Schedule, bf16c: bool) -> Schedule:
    """The schedule a variant runs: the bf16-centroid variants score with "centroid-bf16", the engine's own scorer
    for its bf16 centroid copy (the copy is scored only under that scorer)."""
    return dataclasses.replace(schedule, scorer="centroid-bf16") if bf16c else schedule


def is_what_if(variant: str) -> bool:
    return any(s in variant for s in WHAT_IF)


def is_shipped(variant: str) -> bool:
    return variant.split(PRESET_SEP)[0] == SHIPPED_SPARSE


def base_variant(variant: str) -> str:
    """The variant's backend configuration name (preset and unfused suffixes removed)."""
    return variant.split(PRESET_SEP)[0].removesuffix(UNFUSED)


def parse_env_variants(text: str) -> dict[str, dict[str, str]]:
    """'+w8=SPARROW_DECODE_WAVES=8,+x=A=1;B=2' -> {'+w8': {'SPARROW_DECODE_WAVES': '8'}, '+x': {'A': '1', 'B': '2'}}."""
    out = {}
    for item in (i for i in text.split(",") if i.strip()):
        suffix, _, settings = item.strip().partition("=")
        out[suffix] = dict(kv.split("=", 1) for kv in settings.split(";") if kv)
    return out


def check_variants(text: str) -> None:
    """--variants names known variants, and sparse ones come with a dense baseline (speedups are against the
    fastest dense one) and are not only what-ifs: refused before any GPU time is spent, not after the timing."""
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in DENSE_VARIANTS and v not in SPARSE_VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(DENSE_VARIANTS | SPARSE_VARIANTS)}")
    sparse = [v for v in names if v in SPARSE_VARIANTS]
    if sparse and not any(v in DENSE_VARIANTS for v in names):
        raise SystemExit(f"--variants {text!r}: the sparse variants' speedups need a dense baseline; add dense-triton")
    if sparse and all(is_what_if(v) for v in sparse):
        raise SystemExit(f"--variants {text!r}: {sparse} are what-if variants; add the shipped one ({SHIPPED_SPARSE})")


def with_suffix(variant: str, suffix: str) -> str:
    """'sparse-triton@0.80' + '+w8' -> 'sparse-triton+w8@0.80' (the preset tag stays last)."""
    head, sep, tail = variant.partition(PRESET_SEP)
    return head + suffix + sep + tail


@contextmanager
def env_set(settings: dict[str, str]):
    """Environment variables set while the graphs of a variant are captured (read by the kernels' launchers)."""
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unfused_ops():
    """The engine's elementwise ops as plain torch (the phase-2 engine) while graphs are captured in this block."""
    from sparrow_sgl.engine.fused import FUSED_ENV

    return env_set({FUSED_ENV: "0"})


def hf_like_config(shape, max_context: int) -> SimpleNamespace:
    """The attributes the engine's Qwen3 model reads from a HF config."""
    return SimpleNamespace(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, rms_norm_eps=1e-6, attention_bias=False,
        tie_word_embeddings=shape.tie_word_embeddings, rope_theta=1_000_000.0, rope_parameters=None,
        max_position_embeddings=max(max_context, 40960),
    )


def random_model(shape, max_context: int):
    """The engine's Qwen3ForCausalLM with random bf16 weights (norms 1), built on the meta device first."""
    from sparrow_sgl.engine.model import Qwen3ForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Qwen3ForCausalLM(hf_like_config(shape, max_context))
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.tie_weights()
    model.init_rotary()
    return model.eval()


def page_bytes(shape) -> int:
    """Bytes of one page over all layers: K + V (bf16), float32 key sums + count, bf16 centroid copy."""
    per_layer = 2 * shape.num_kv_heads * PAGE * shape.head_dim * 2 + shape.num_kv_heads * shape.head_dim * (4 + 2) + 4
    return shape.num_layers * per_layer


class RandomPool:
    """Paged K/V of every layer filled with random values, with consistent key sums, counts and centroids."""

    def __init__(self, shape, num_pages: int, seed: int = 0) -> None:
        from sparrow_sgl.attention import PageSummaries

        gen = torch.Generator(device="cuda").manual_seed(seed)
        L, kv, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
        self.k = torch.empty(L, num_pages, kv, PAGE, D, dtype=torch.bfloat16, device="cuda")
        self.v = torch.empty_like(self.k)
        self.summaries, self.centroids = [], []
        unused = torch.zeros(1, kv, D, device="cuda")  # centroid scorer: no min/max kept
        for layer in range(L):
            self.k[layer].normal_(generator=gen)
            self.v[layer].normal_(generator=gen)
            key_sum = torch.empty(num_pages, kv, D, dtype=torch.float32, device="cuda")
            for s in range(0, num_pages, 8192):
                key_sum[s : s + 8192] = self.k[layer, s : s + 8192].float().sum(2)
            count = torch.full((num_pages,), PAGE, dtype=torch.int32, device="cuda")
            self.summaries.append(PageSummaries(key_sum=key_sum, count=count, key_min=unused, key_max=unused))
            self.centroids.append((key_sum / PAGE).to(torch.bfloat16))
        self.num_pages = num_pages

    def bind(self, model) -> None:
        for i, attn in enumerate(model.attention_layers):
            attn.k_cache, attn.v_cache, attn.summaries = self.k[i], self.v[i], self.summaries[i]


def fit_batch(shape, max_context: int, margin_gib: float, max_batch: int) -> int:
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    per_request = math.ceil(max_context / PAGE) * page_bytes(shape)
    return max(1, min(max_batch, int((free - margin_gib * GIB) // per_request)))


def interp_extrapolate(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Linear interpolation, extended linearly past both ends (step time is about affine in context)."""
    y = np.interp(x, xp, fp)
    if len(xp) >= 2:
        lo, hi = x < xp[0], x > xp[-1]
        y[lo] = fp[0] + (x[lo] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
        y[hi] = fp[-1] + (x[hi] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return np.maximum(y, 0.0)


def with_width_steps(contexts: list[int], max_context: int) -> list[int]:
    """The contexts plus, after each that fills a power-of-two number of pages, the context one page later: there the
    engine's block-table width doubles (`cuda_graph.step_width`), so the rollout integral sees the jump in step time
    instead of a line across it."""
    pages = [c // PAGE for c in contexts if c % PAGE == 0]
    steps = {(p + 1) * PAGE for p in pages if p and not p & (p - 1) and (p + 1) * PAGE <= max_context}
    return sorted(set(contexts) | steps)


def rollout_seconds(contexts: list[int], step_ms: list[float], max_context: int) -> float:
    """Decode time of one rollout step per KV length 1..max_context, from step times measured at `contexts`."""
    grid = np.arange(1, max_context + 1, dtype=float)
    return float(interp_extrapolate(grid, np.asarray(contexts, float), np.asarray(step_ms, float)).sum() / 1e3)


def bytes_terms(model_name: str, batch: int, context: int, schedule, summary_bytes: int) -> float:
    """Bytes one decode step moves (weights + KV + summaries) under the cost model's bytes-only accounting."""
    from sparrow_sgl.costmodel import AnalyticCost

    cost = AnalyticCost(model_name, "h100", summary_bytes=summary_bytes, bytes_only=True)
    return cost.step_cost(batch, context, schedule.budget_at(context), schedule).bytes


def measure(runner, tokens, positions, block_tables, schedule, sparsity, reps: int, wall_reps: int) -> dict:
    sparsity = dataclasses.replace(sparsity, scorer=schedule.scorer)  # the variant's scorer (`with_scorer`)
    runner.decode(tokens, positions, block_tables, schedule, sparsity, table_key="bench")  # captures on first use
    torch.cuda.synchronize()
    step = runner.last_step
    fn = step.graph.replay if step.graph is not None else step.forward
    timing = time_us(fn, reps=reps, warmup=2, flush=False)
    start = time.perf_counter()
    for _ in range(wall_reps):
        runner.decode(tokens, positions, block_tables, schedule, sparsity, table_key="bench")
        torch.cuda.synchronize()
    wall_ms = round((time.perf_counter() - start) / wall_reps * 1e3, 4) if wall_reps else None
    return {"step_ms": round(timing["median_us"] / 1e3, 4), "step_p20_ms": round(timing["p20_us"] / 1e3, 4),
            "step_p80_ms": round(timing["p80_us"] / 1e3, 4), "wall_ms": wall_ms,
            "graph": step.graph is not None}


def run_model(name: str, args, bw: float, info: dict) -> tuple[list[dict], list[dict]]:
    """(decode_e2e rows, decode_profile rows) of one model."""
    from sparrow_sgl.attention.kernels import dispatch
    from sparrow_sgl.costmodel import bytes_limit_speedup
    from sparrow_sgl.engine.cuda_graph import GraphDecodeRunner
    from sparrow_sgl.hardware import get_model_shape
    from sparrow_sgl.schedule import load_preset

    shape = get_model_shape(name)
    presets = [load_preset(f"{name}-{tau}") for tau in args.presets.split(",") if tau]
    preset = presets[0]
    dense = Schedule.dense(page_size=PAGE, bin_tokens=preset.bin_tokens, dense_layers=list(preset.dense_layers))
    sparsity = dataclasses.replace(preset.sparsity(), kv_layout="HND")
    contexts = with_width_steps([c for c in parse_ints(args.contexts) if c <= args.max_context], args.max_context)
    model = random_model(shape, args.max_context)
    batch = args.batch or fit_batch(shape, args.max_context, args.margin_gib, args.max_batch)
    pages_per_request = math.ceil(args.max_context / PAGE)
    pool = RandomPool(shape, batch * pages_per_request)
    pool.bind(model)
    gen = torch.Generator().manual_seed(1)
    block_tables = torch.randperm(pool.num_pages, generator=gen).view(batch, pages_per_request).int().numpy()
    tokens = torch.randint(0, shape.vocab_size, (batch,), generator=gen).tolist()
    print(f"{name}: batch {batch} x {args.max_context} tokens, KV pool {pool.num_pages} pages "
          f"({pool.num_pages * page_bytes(shape) / GIB:.1f} GiB), weights "
          f"{sum(p.numel() for p in model.parameters()) * 2 / GIB:.1f} GiB", flush=True)
    fi = dispatch.installed("flashinfer")

    def runner(dense_be, sparse_be, bf16c=False, one_launch=False):
        if not fi:
            dense_be, sparse_be = "triton", "triton"
        r = GraphDecodeRunner(model, "cuda", dense_backend=dense_be, sparse_backend=sparse_be,
                              one_launch_select=one_launch)
        r.centroids = pool.centroids if bf16c else None
        return r

    keep = set(args.variants.split(",")) if args.variants else None
    wanted = lambda v: keep is None or v in keep
    variants = {v: (dense, runner(be, be)) for v, be in DENSE_VARIANTS.items() if (fi or be == "triton") and wanted(v)}
    for p in presets:
        suffix = "" if p is preset else PRESET_SEP + p.name.rsplit("-", 1)[-1]
        variants |= {v + suffix: (with_scorer(p, cfg[2]), runner(*cfg)) for v, cfg in SPARSE_VARIANTS.items()
                     if (fi or "fi" not in v) and wanted(v)}
    base = {"kind": "decode_step", "model": name, "gpu": info.get("gpu"), "batch": batch, "torch": info["torch"],
            "date": info["date"], "copy_bw_gbs": bw, "page_size": PAGE, "dtype": "bfloat16"}
    point = dict(name=name, base=base, batch=batch, tokens=tokens, block_tables=block_tables, sparsity=sparsity,
                 contexts=contexts, args=args, bw=bw)
    rows = measure_group(variants, **point)
    chosen = [v for v in args.unfused.split(",") if v in variants]
    if chosen:  # fresh runners, so their graphs are captured with the unfused ops
        backends = {v: (be, be) for v, be in DENSE_VARIANTS.items()} | {v: c for v, c in SPARSE_VARIANTS.items()}
        unfused = {v + UNFUSED: (variants[v][0], runner(*backends[v])) for v in chosen}
        with unfused_ops():
            rows += measure_group(unfused, **point)
        del unfused
    env_of: dict[str, dict[str, str]] = {}  # kernel-setting variants: fresh runners captured under their env
    for suffix, settings in parse_env_variants(args.env_variants).items():
        backends = {v: (be, be) for v, be in DENSE_VARIANTS.items()} | dict(SPARSE_VARIANTS)
        group = {with_suffix(v, suffix): (variants[v][0], runner(*backends[base_variant(v)]))
                 for v in args.env_base.split(",") if v in variants}
        with env_set(settings):
            rows += measure_group(group, **point)
        env_of |= {v: settings for v in group}
        variants |= group
    limits = {p.name: bytes_limit_speedup(name, p, [args.max_context], batch) for p in presets}
    for family in ("", UNFUSED):
        family_rows = [r for r in rows if r["variant"].endswith(UNFUSED) == bool(family)]
        for p in presets:
            sub = [r for r in family_rows if r["variant"].startswith("dense") or r["schedule"] == p.name]
            if any(r["variant"].startswith("sparse") for r in sub):
                rows += summarize(name, sub, p, dense, batch, args.max_context, limits[p.name], base,
                                  what_if=bool(family))
    if args.drain:
        from bench.decode_drain import drain_batches, drain_summary

        best = {r["variant"] for r in rows if r["kind"] == "decode_step"}
        chosen_runners = {v: sr for v, sr in variants.items() if v in best}
        for b in drain_batches(batch, args.drain_batches):
            sub_point = point | {"batch": b, "tokens": tokens[:b], "block_tables": block_tables[:b],
                                 "base": base | {"batch": b}}
            for v, sr in chosen_runners.items():
                with env_set(env_of.get(v, {})):
                    rows += measure_group({v: sr}, **sub_point, wall_reps=0)
        rows += drain_summary(name, rows, presets, dense, batch, args, base)
    profile_rows = profile_model(variants, point, shape, args, env_of) if args.profile else []
    del variants
    return rows, profile_rows


def profile_model(variants, point, shape, args, env_of: dict) -> list[dict]:
    """Kernel time by class of each variant's graph at the profile contexts (after all timing is done)."""
    from bench.decode_profile import floors_ms, profile_kernels, step_bytes, summarize_kernels

    out = []
    keep = set(args.profile_variants.split(",")) if args.profile_variants else None
    for context in [c for c in parse_ints(args.profile_contexts) if c <= args.max_context]:
        positions = [context - 1] * point["batch"]
        for vname, (schedule, runner) in variants.items():
            if PRESET_SEP in vname or keep is not None and base_variant(vname).split("+")[0] not in keep:
                continue  # the first preset only; a kept variant with any suffix
            with env_set(env_of.get(vname, {})):
                m = measure(runner, point["tokens"], positions, point["block_tables"], schedule, point["sparsity"],
                            args.reps, 0)
            step = runner.last_step
            kernels = profile_kernels(step.graph.replay if step.graph is not None else step.forward,
                                      args.profile_steps)
            budget = schedule.budget_at(context)
            nbytes = step_bytes(shape, point["batch"], context, budget, len(schedule.dense_layers),
                                2 if runner.centroids is not None else 4)
            summary = summarize_kernels(kernels, args.profile_steps, floors_ms(nbytes, point["bw"]))
            out.append({"model": point["name"], "batch": point["batch"], "variant": vname, "context": context,
                        "budget": budget, "schedule": schedule.name, "dense_backend": runner.dense_backend,
                        "sparse_backend": runner.sparse_backend if budget is not None else None,
                        "step_ms": m["step_ms"]} | summary)
            print(json.dumps({k: out[-1][k] for k in ("model", "variant", "context", "step_ms", "kernel_ms")}),
                  flush=True)
    return out


def measure_group(variants, *, name, base, batch, tokens, block_tables, sparsity, contexts, args, bw,
                  wall_reps: int | None = None):
    """Time every variant at every context (graphs captured at the first context, replayed after)."""
    wall_reps = args.wall_reps if wall_reps is None else wall_reps
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is also printed line by line
        tqdm = None
    bar = tqdm(total=len(contexts) * len(variants), desc=name, unit="step") if tqdm else None
    rows = []
    for context in contexts:
        positions = [context - 1] * batch
        for vname, (schedule, runner) in variants.items():
            m = measure(runner, tokens, positions, block_tables, schedule, sparsity, args.reps, wall_reps)
            bf16c = runner.centroids is not None
            nbytes = bytes_terms(name, batch, context, schedule, 2 if bf16c else 4)
            row = base | {"context": context, "budget": schedule.budget_at(context), "variant": vname,
                          "fused_ops": not vname.endswith(UNFUSED),
                          "schedule": schedule.name, "dense_backend": runner.dense_backend,
                          "sparse_backend": None if schedule.is_dense else runner.sparse_backend,
                          "scorer": None if schedule.is_dense else schedule.scorer,
                          "centroids": "bf16" if bf16c else "float32-sum"} | m
            row |= {"tokens_per_s": round(batch / (m["step_ms"] / 1e3), 1), "bytes_gb": round(nbytes / 1e9, 4),
                    "floor_ms": round(nbytes / (bw * 1e9) * 1e3, 4)}
            row["over_floor"] = round(m["step_ms"] / row["floor_ms"], 3)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("model", "variant", "context", "budget", "step_ms", "wall_ms",
                                                    "over_floor")}), flush=True)
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return rows


def summarize(name, rows, preset, dense, batch, max_context, limit, base, what_if=False) -> list[dict]:
    """Per-context speedups vs the best dense variant, rollout speedups, and the kind of each step row.

    The fastest dense variant (the baseline), the shipped sparse one (the fastest other than a what-if where the
    shipped one was not timed) and the engine under the "centroid-bf16" scorer (`SHIPPED_BF16_SCORER`) become
    `decode_step` rows (the cost model's input, told apart by their `scorer`); the others, and every what-if row
    (e.g. the unfused baseline), `decode_step_variant`."""
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    totals = {v: rollout_seconds([r["context"] for r in rs], [r["step_ms"] for r in rs], max_context)
              for v, rs in by_variant.items()}
    dense_names = [v for v in totals if v.startswith("dense")]
    sparse_names = [v for v in totals if v.startswith("sparse")]
    best_dense = min(dense_names, key=totals.get)
    shipped = [v for v in sparse_names if is_shipped(v)]
    best_sparse = shipped[0] if shipped else min((v for v in sparse_names if not is_what_if(v)), key=totals.get)
    dense_at = {r["context"]: r for r in by_variant[best_dense]}
    cost_rows = {best_dense, best_sparse} | {v for v in sparse_names if base_variant(v) == SHIPPED_BF16_SCORER
                                             and not v.endswith(UNFUSED)}
    for r in rows:
        if what_if or r["variant"] not in cost_rows:
            r["kind"] = "decode_step_variant"
        if r["variant"].startswith("sparse"):
            d = dense_at[r["context"]]
            limit_ctx = bytes_terms(name, batch, r["context"], dense, 2) / bytes_terms(name, batch, r["context"],
                                                                                       preset, 2)
            r |= {"speedup": round(d["step_ms"] / r["step_ms"], 3), "bytes_limit_speedup": round(limit_ctx, 3),
                  "ratio_to_bytes_limit": round(d["step_ms"] / r["step_ms"] / limit_ctx, 3)}
    summary = []
    for v in sparse_names:
        speedup = totals[best_dense] / totals[v]
        summary.append(base | {
            "kind": "decode_rollout", "variant": v, "schedule": preset.name, "dense_variant": best_dense,
            "max_context": max_context, "rollout_dense_s": round(totals[best_dense], 3),
            "rollout_sparse_s": round(totals[v], 3), "rollout_speedup": round(speedup, 3),
            "bytes_limit_speedup": round(limit, 3), "ratio_to_bytes_limit": round(speedup / limit, 3),
            "dense_tokens_per_s": round(batch * max_context / totals[best_dense], 1),
            "sparse_tokens_per_s": round(batch * max_context / totals[v], 1), "best": v == best_sparse,
            "what_if": what_if or is_what_if(v),
            "note": "step times interpolated linearly between sampled contexts; every request at the same length",
        })
    return summary


def append_rows(path: Path, rows: list[dict], supersede: bool = False) -> None:
    """Extend the flat JSON list at `path` (what `costmodel.load_decode_rows` reads).

    supersede: earlier `decode_step` rows of the same model, GPU, batch and kind (dense, or sparse of one scorer) as
    `rows` become `decode_step_superseded` (kept, but no longer averaged into the measured cost model, which should
    time the engine as it ships now); rows of other GPUs, batches or scorers stay the cost model's input."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.is_file() else []
    key = lambda r: (r.get("model"), r.get("gpu"), r.get("batch"),
                     "dense" if r.get("budget") is None else r.get("scorer") or "centroid")
    fresh = {key(r) for r in rows if r.get("kind") == "decode_step"} if supersede else set()
    for r in existing:
        if r.get("kind") == "decode_step" and key(r) in fresh:
            r["kind"] = "decode_step_superseded"
    write_json_atomic(path, existing + rows)


def print_table(rows: list[dict]) -> None:
    print("\nrollout 1 -> max_context tokens, every request growing together; ms = CUDA-graph step (median)")
    print(f"{'model':11} {'batch':>5} {'variant':26} {'speedup':>8} {'bytes-limit':>11} {'ratio':>6} "
          f"{'dense tok/s':>11} {'sparse tok/s':>12}")
    for r in rows:
        if r["kind"] == "decode_rollout":
            print(f"{r['model']:11} {r['batch']:>5} {r['variant']:26} {r['rollout_speedup']:>7}x "
                  f"{r['bytes_limit_speedup']:>10}x {r['ratio_to_bytes_limit']:>6} {r['dense_tokens_per_s']:>11} "
                  f"{r['sparse_tokens_per_s']:>12}" + ("  <- shipped" if r["best"] else ""))
    print(f"\n{'model':11} {'batch':>5} {'ctx':>6} {'variant':26} {'budget':>6} {'step ms':>8} {'wall ms':>8} "
          f"{'x floor':>7} {'speedup':>7} {'limit':>6}")
    for r in rows:
        if r["kind"].startswith("decode_step") and r["context"] in (2048, 8192, 16384, 24576, 32768):
            print(f"{r['model']:11} {r['batch']:>5} {r['context']:>6} {r['variant']:26} {str(r['budget']):>6} "
                  f"{r['step_ms']:>8} "
                  f"{str(r['wall_ms']):>8} {r['over_floor']:>7} {r.get('speedup', '-'):>7} "
                  f"{r.get('bytes_limit_speedup', '-'):>6}")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-1.7b,qwen3-4b,qwen3-8b")
    p.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="KV lengths (tokens) at which the step is timed")
    p.add_argument("--max-context", type=int, default=32768, help="rollout length; sizes the KV pool per request")
    p.add_argument("--batch", type=int, default=0, help="requests (0 = the largest that fits)")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--margin-gib", type=float, default=4.0, help="GPU memory left for activations and graphs")
    p.add_argument("--reps", type=int, default=10, help="timed graph replays per point (median)")
    p.add_argument("--wall-reps", type=int, default=3, help="host-inclusive decode calls per point (mean)")
    p.add_argument("--unfused", default="dense-triton,sparse-triton",
                   help="variants re-timed with the unfused elementwise ops (SPARROW_FUSED_OPS=0), '' for none")
    p.add_argument("--variants", default="", help="comma list of variants to time ('' = all that can run)")
    p.add_argument("--env-variants", default="",
                   help="kernel settings timed as variants: '+NAME=ENV=VALUE[;ENV=VALUE],...' (e.g. "
                        "'+w8=SPARROW_DECODE_WAVES=8'), each over the --env-base variants, graphs captured under it")
    p.add_argument("--env-base", default="dense-triton,sparse-triton,sparse-triton@0.80")
    p.add_argument("--presets", default="0.86", help="tau of the qwen3-*-<tau> presets timed, first = the main one")
    p.add_argument("--results-dir", default=None, help="where decode_e2e.json is extended (default bench/results)")
    p.add_argument("--profile", action="store_true",
                   help="also time each variant's kernels by class (torch.profiler) -> decode_profile.json")
    p.add_argument("--profile-contexts", default="2k,16k,32k")
    p.add_argument("--profile-variants", default="dense-triton,sparse-triton,sparse-triton-bf16c",
                   help="variants profiled, each with its suffixed forms (+fidense, ...); first preset only")
    p.add_argument("--profile-steps", type=int, default=5, help="graph replays under the profiler")
    p.add_argument("--drain", action="store_true",
                   help="also time the best variants at smaller batches and integrate a drained rollout")
    p.add_argument("--drain-batches", type=int, default=4, help="batches timed: the full one halved this many times")
    p.add_argument("--drain-requests", type=int, default=0, help="requests of the drained rollout (0 = 4 x batch)")
    p.add_argument("--drain-lengths", default="1k,32k", help="response lengths uniform in [min, max] tokens")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> list[dict]:
    args = args or build_parser().parse_args(argv)
    check_variants(args.variants)
    require_cuda()
    info = device_info()
    bw = copy_bandwidth_gbs()
    print(f"{info.get('gpu')}: copy bandwidth {bw} GB/s (read + write)", flush=True)
    out = results_dir(args.results_dir) / "decode_e2e.json"
    profile_path = out.parent / "decode_profile.json"
    earlier_profiles = json.loads(profile_path.read_text()) if args.profile and profile_path.is_file() else []
    rows, profile_rows = [], []
    with torch.inference_mode():
        for name in [m for m in args.models.split(",") if m]:
            try:
                model_rows, model_profile = run_model(name, args, bw, info)
            except torch.cuda.OutOfMemoryError as e:
                print(f"{name}: out of GPU memory ({e}); lower --batch or raise --margin-gib", flush=True)
                torch.cuda.empty_cache()
                continue
            finally:
                gc.collect()  # runners and their steps reference each other: free the model's pool now
                torch.cuda.empty_cache()
            append_rows(out, model_rows, supersede=True)  # per model, so a cut-short run keeps what it measured
            rows += model_rows
            if args.profile:  # this run's record, rewritten per model
                from bench.decode_profile import profile_record
                from bench.kernel_resources import step_kernel_resources

                profile_rows += model_profile
                record = profile_record(info, bw, profile_rows, step_kernel_resources())
                write_json_atomic(profile_path, earlier_profiles + [record])
    print_table(rows)
    if args.profile:
        from bench.decode_profile import print_profile

        print_profile(profile_rows)
    if args.drain:
        from bench.decode_drain import print_drain

        print_drain(rows)
    return rows


if __name__ == "__main__":
    main()
