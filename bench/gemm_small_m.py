"""The decode step's GEMMs at small M (the padded batch) against their weight-bytes floor: cuBLAS settings vs the
small-M Triton GEMM (`sparrow_sgl/attention/kernels/triton_linear.py`).

Each model's linear layers (qkv, o, gate_up, down over all layers, then the LM head) are run in sequence on distinct
weights, as in a decode step (so no weight is L2-resident), captured in one CUDA graph and timed by replay, under
each setting: torch's cuBLAS settings (the default, `allow_bf16_reduced_precision_reduction=False` = no
reduced-precision split-K, cuBLASLt preferred), `triton` (every GEMM on its fastest Triton config), `triton-pdl`
(the same launched with programmatic dependent launch, configs timed with it), `auto` (per shape the faster of
cuBLAS and Triton, what `engine.linear.Linear` picks) and `auto-old` (the same over the tiles before session 8).
`down+silu` is down_proj with the MLP's SiLU x up: cuBLAS settings run `fused.silu_mul` then the GEMM, the Triton
ones fuse it into the GEMM's load; `all+silu` is the engine's layer order (qkv, o, gate_up, down+silu per layer,
then the LM head).

Before the stack timings, one `tune` row per shape: cuBLAS and the best Triton config each timed alone from a cold
L2 (`engine.linear.time_choices`, the engine's auto choice). Then `stack` rows: ms, weight GB, achieved GB/s and
floor / time. Prints JSON rows.

    python -m bench.gemm_small_m --models qwen3-4b --m 32,64 --settings default,triton,triton-pdl,auto
    python -m bench.gemm_small_m --write-choices bench/results/gemm_small_m.json   # CPU: the engine's table
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth_gbs, device_info, graph_time_us, parse_ints, require_cuda

CHOICES_PATH = Path(__file__).resolve().parents[1] / "sparrow_sgl" / "data" / "linear_choices.json"
BLAS_SETTINGS = ("default", "no-reduced-precision", "cublaslt", "cublas")
TRITON_SETTINGS = ("triton", "triton-pdl", "auto", "auto-old")
OLD_TILES = 5  # `auto-old`: `auto` over the first five tiles of triton_linear.TILES only (the tiles before session 8)
Item = tuple[torch.Tensor, bool]  # a weight [N, K], and whether its input is gate_up (SiLU x up fused in)


def layer_shapes(shape) -> dict[str, tuple[int, int]]:
    """(out features, in features) of each linear layer of one decoder layer."""
    q, kv, h = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, shape.hidden_size
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * shape.intermediate_size, h),
            "down": (h, shape.intermediate_size)}


@contextmanager
def blas_setting(name: str):
    """A torch cuBLAS setting for the GEMMs captured inside the block."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_bf16_reduced_precision_reduction, torch.backends.cuda.preferred_blas_library())
    try:
        if name == "no-reduced-precision":
            matmul.allow_bf16_reduced_precision_reduction = False
        elif name in ("cublaslt", "cublas"):
            torch.backends.cuda.preferred_blas_library(name)
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = saved[0]
        torch.backends.cuda.preferred_blas_library(saved[1])


def shape_key(w: torch.Tensor, silu: bool, pdl: bool) -> tuple:
    return (*w.shape, silu, pdl)


def tune(items: list[Item], m: int, pdl: bool, plan: dict) -> None:
    """plan[shape_key] = time_choices (cuBLAS: None, Triton: Config -> us) for each new shape among items."""
    from sparrow_sgl.engine.linear import time_choices

    for w, silu in items:
        key = shape_key(w, silu, pdl)
        if key not in plan:
            x = torch.randn(m, w.shape[1] * (2 if silu else 1), device="cuda", dtype=w.dtype)
            plan[key] = time_choices(x, w, silu=silu, pdl=pdl)


def best(timings: dict, triton_only: bool, old_tiles: bool = False):
    """The fastest choice: a Triton Config, or None (cuBLAS; also when no Triton config launched)."""
    from sparrow_sgl.attention.kernels.triton_linear import TILES

    pool = {k: t for k, t in timings.items() if k is not None} if triton_only else timings
    if old_tiles:
        pool = {k: t for k, t in pool.items()
                if k is None or (k.block_n, k.block_k, k.num_warps, k.num_stages) in TILES[:OLD_TILES]}
    return min(pool, key=pool.get) if pool else None


def stack_fn(items: list[Item], m: int, setting: str, plan: dict):
    """The captured callable: every GEMM of `items` in order under `setting`."""
    from sparrow_sgl.attention.kernels.triton_linear import linear
    from sparrow_sgl.engine.fused import silu_mul

    inputs = {(w.shape[1], silu): torch.randn(m, w.shape[1] * (2 if silu else 1), device="cuda", dtype=w.dtype)
              for w, silu in items}
    pdl = setting == "triton-pdl"
    configs = [None if setting in BLAS_SETTINGS else
               best(plan[shape_key(w, silu, pdl)], not setting.startswith("auto"), setting == "auto-old")
               for w, silu in items]

    def run() -> None:
        for (w, silu), config in zip(items, configs):
            x = inputs[w.shape[1], silu]
            if config is None:
                F.linear(silu_mul(x) if silu else x, w)
            else:
                linear(x, w, None, config, silu_input=silu, pdl=pdl)

    return run


def time_stack(items: list[Item], m: int, setting: str, plan: dict) -> float:
    """Median ms of one CUDA-graph replay of the stack."""
    fn = stack_fn(items, m, setting, plan)
    with blas_setting(setting):
        return graph_time_us(fn, reps=10, warmup=2, flush=False)["median_us"] / 1e3


def model_groups(shape) -> dict[str, list[Item]]:
    per_layer = {k: [torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(shape.num_layers)]
                 for k, s in layer_shapes(shape).items()}
    per_layer["lm_head"] = [torch.randn(shape.vocab_size, shape.hidden_size, device="cuda",
                                        dtype=torch.bfloat16) * 0.02]
    groups = {k: [(w, False) for w in ws] for k, ws in per_layer.items()}
    groups["down+silu"] = [(w, True) for w in per_layer["down"]]
    groups["all"] = [item for k in ("qkv", "o", "gate_up", "down", "lm_head") for item in groups[k]]
    layers = zip(groups["qkv"], groups["o"], groups["gate_up"], groups["down+silu"])
    groups["all+silu"] = [item for layer in layers for item in layer] + groups["lm_head"]
    return groups


def tune_rows(name: str, m: int, groups: dict, plan: dict, pdl: bool, gpu: str | None = None) -> list[dict]:
    rows = []
    for group in ("qkv", "o", "gate_up", "down", "down+silu", "lm_head"):
        w, silu = groups[group][0]
        timings = plan[shape_key(w, silu, pdl)]
        config = best(timings, triton_only=True)
        triton_us = timings.get(config) if config is not None else None
        rows.append({"kind": "tune", "gpu": gpu, "model": name, "m": m, "gemm": group, "pdl": pdl, "n": w.shape[0],
                     "k": w.shape[1], "cublas_us": round(timings[None], 2),
                     "triton_us": None if triton_us is None else round(triton_us, 2),
                     "cublas_over_triton": None if triton_us is None else round(timings[None] / triton_us, 3),
                     "config_n_k_split_warps_stages": None if config is None else list(astuple(config)),
                     "configs_timed": sum(k is not None for k in timings)})
    return rows


def run(args) -> list[dict]:
    from sparrow_sgl.hardware import get_model_shape

    info, bw = device_info(), copy_bandwidth_gbs()
    settings = args.settings.split(",")
    rows = []
    for name in args.models.split(","):
        groups = model_groups(get_model_shape(name))
        for m in parse_ints(args.m):
            plan: dict = {}
            for pdl in sorted({s == "triton-pdl" for s in settings if s in TRITON_SETTINGS}):
                tune(groups["all"] + groups["down+silu"], m, pdl, plan)
                rows += tune_rows(name, m, groups, plan, pdl, info.get("gpu"))
                for row in rows[-6:]:
                    print(json.dumps(row), flush=True)
            for setting in settings:
                for group, items in groups.items():
                    ms = time_stack(items, m, setting, plan)
                    gb = sum(w.numel() * w.element_size() for w, _ in items) / 1e9
                    rows.append({"kind": "stack", "model": name, "m": m, "setting": setting, "gemm": group,
                                 "ms": round(ms, 4), "weight_gb": round(gb, 4), "gbs": round(gb / ms * 1e3, 1),
                                 "floor_over_time": round(gb / bw * 1e3 / ms, 3), "gpu": info.get("gpu"),
                                 "date": info["date"], "copy_bw_gbs": bw, "triton": info.get("triton")})
                    print(json.dumps(rows[-1]), flush=True)
        del groups
        torch.cuda.empty_cache()
    return rows


def write_choices(rows_path: str, out: Path = CHOICES_PATH) -> list[dict]:
    """The engine's shipped table from the tune rows in `rows_path` (a later row of the same key wins)."""
    from sparrow_sgl.engine.linear_table import table_from_tune_rows
    from sparrow_sgl.jsonio import read_json, write_json_atomic

    rows = read_json(rows_path, "gemm_small_m rows")
    table = table_from_tune_rows(rows)
    write_json_atomic(out, table)
    print(f"{out}: " + ", ".join(f"{gpu} {len(keys)} shapes" for gpu, keys in table.items()))
    return [r for r in rows if r.get("kind") == "tune"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-1.7b,qwen3-4b,qwen3-8b")
    p.add_argument("--m", default="32,64", help="rows of the activations (the graph's padded batch)")
    p.add_argument("--settings", default="default,triton,triton-pdl,auto",
                   help=f"comma list of {BLAS_SETTINGS + TRITON_SETTINGS}")
    p.add_argument("--write-choices", metavar="ROWS_JSON", default=None,
                   help="no GPU: build sparrow_sgl/data/linear_choices.json (the engine's shipped per-GPU choices) "
                        "from the tune rows of this file (e.g. bench/results/gemm_small_m.json)")
    args = p.parse_args(argv)
    if args.write_choices:
        return write_choices(args.write_choices)
    unknown = set(args.settings.split(",")) - set(BLAS_SETTINGS + TRITON_SETTINGS)
    if unknown:
        p.error(f"unknown settings {sorted(unknown)}")
    require_cuda()
    return run(args)


if __name__ == "__main__":
    main()
