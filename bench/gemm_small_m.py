"""The decode step's GEMMs at small M (the padded batch) against their weight-bytes floor, per cuBLAS setting.

Each model's linear layers (qkv, o, gate_up, down over all layers, then the LM head) are run in sequence on distinct
weights, as in a decode step (so no weight is L2-resident), captured in one CUDA graph and timed by replay, under
torch's cuBLAS settings: the default, `allow_bf16_reduced_precision_reduction=False` (no reduced-precision split-K)
and cuBLASLt preferred. Prints JSON rows: ms, weight GB, achieved GB/s and floor / time.

    python -m bench.gemm_small_m --models qwen3-4b --m 32,64
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth_gbs, device_info, graph_time_us, parse_ints, require_cuda


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


def time_linears(weights: list[torch.Tensor], m: int, setting: str) -> float:
    """Median ms of F.linear(x, w) over `weights` in sequence, one CUDA graph."""
    inputs = {w.shape[1]: torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16) for w in weights}
    with blas_setting(setting):
        timing = graph_time_us(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], reps=10, warmup=2,
                               flush=False)
    return timing["median_us"] / 1e3


def run(args) -> list[dict]:
    from sparrow_sgl.hardware import get_model_shape

    info, bw = device_info(), copy_bandwidth_gbs()
    rows = []
    for name in args.models.split(","):
        shape = get_model_shape(name)
        per_layer = {k: [torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(shape.num_layers)]
                     for k, s in layer_shapes(shape).items()}
        per_layer["lm_head"] = [torch.randn(shape.vocab_size, shape.hidden_size, device="cuda",
                                            dtype=torch.bfloat16) * 0.02]
        groups = per_layer | {"all": [w for ws in per_layer.values() for w in ws]}
        for m in parse_ints(args.m):
            for setting in args.settings.split(","):
                for group, ws in groups.items():
                    ms = time_linears(ws, m, setting)
                    gb = sum(w.numel() * 2 for w in ws) / 1e9
                    rows.append({"model": name, "m": m, "setting": setting, "gemm": group, "ms": round(ms, 4),
                                 "weight_gb": round(gb, 4), "gbs": round(gb / ms * 1e3, 1),
                                 "floor_over_time": round(gb / bw * 1e3 / ms, 3), "gpu": info.get("gpu"),
                                 "date": info["date"], "copy_bw_gbs": bw})
                    print(json.dumps(rows[-1]), flush=True)
        del per_layer, groups
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-1.7b,qwen3-4b,qwen3-8b")
    p.add_argument("--m", default="32,64", help="rows of the activations (the graph's padded batch)")
    p.add_argument("--settings", default="default,no-reduced-precision,cublaslt,cublas")
    require_cuda()
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
