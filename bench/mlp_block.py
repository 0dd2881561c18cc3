"""The decoder's MLP half as one persistent launch (`triton_mlp_block.py`) vs the three launches the engine runs today
(fused add + RMSNorm, gate_up GEMM, down GEMM with SiLU x up in its load), over a model's layers with distinct
weights (as in a decode step: no weight stays in L2), each captured in one CUDA graph and timed by replay.

Variants: `chain` (the engine's: `engine.linear.Linear` picks cuBLAS or a Triton tile per shape, from the shipped
table on an H200), `chain-same` (the chain on the block's own tiles: what persistence alone changes), and
`block-<P>x` (the block with P programs per SM). Rows: ms for the stack, us per layer, weight GB, floor / time
(weight bytes at the measured copy bandwidth), and the largest difference of layer 0's output from the chain's.

    python -m bench.mlp_block --models qwen3-1.7b,qwen3-4b,qwen3-8b --m 32,64 --programs 1,2,3,4
"""

from __future__ import annotations

import argparse

import torch

from bench.common import copy_bandwidth_gbs, device_info, emit, graph_time_us, parse_ints, require_cuda

EPS = 1e-6


def make_layers(shape, layers: int) -> list[dict]:
    h, i = shape.hidden_size, shape.intermediate_size
    return [{"norm": (1 + 0.1 * torch.randn(h, device="cuda")).to(torch.bfloat16),
             "gate_up": 0.02 * torch.randn(2 * i, h, device="cuda", dtype=torch.bfloat16),
             "down": 0.02 * torch.randn(h, i, device="cuda", dtype=torch.bfloat16)} for _ in range(layers)]


def chain_fn(layers: list[dict], x: torch.Tensor, res: torch.Tensor, plan=None):
    """The engine's three launches per layer; plan: force the block's tiles (`chain-same`), else the engine's pick."""
    from sparrow_sgl.attention.kernels.triton_linear import linear
    from sparrow_sgl.engine import fused
    from sparrow_sgl.engine.linear import Linear

    def module(weight: torch.Tensor) -> Linear:
        mod = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        mod.weight = torch.nn.Parameter(weight, requires_grad=False)
        return mod

    mods = [(layer["norm"], module(layer["gate_up"]), module(layer["down"])) for layer in layers]

    def run() -> torch.Tensor:
        out = None
        for norm, gu, down in mods:
            h, _ = fused.add_rms_norm(x, res, norm, EPS)
            if plan is None:
                y = down.forward_silu_mul(gu(h))
            else:
                y = linear(linear(h, gu.weight, None, plan.gate_up), down.weight, None, plan.down, silu_input=True)
            out = y if out is None else out
        return out

    return run


def block_fn(layers: list[dict], x: torch.Tensor, res: torch.Tensor, plan):
    from sparrow_sgl.attention.kernels.triton_mlp_block import mlp_block

    def run() -> torch.Tensor:
        out = None
        for layer in layers:
            y, _ = mlp_block(x, res, layer["norm"], EPS, layer["gate_up"], layer["down"], plan)
            out = y if out is None else out
        return out

    return run


def measure(name: str, m: int, layers: list[dict], programs: list[int], bw: float) -> list[dict]:
    from sparrow_sgl.attention.kernels.triton_linear import num_sms
    from sparrow_sgl.attention.kernels.triton_mlp_block import default_plan

    h, i = layers[0]["down"].shape
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    gb = len(layers) * 3 * h * i * 2 / 1e9
    plans = {f"block-{p}x": default_plan(m, h, i, x.device, p * num_sms(x.device)) for p in programs}
    same = default_plan(m, h, i, x.device)
    variants = {"chain": chain_fn(layers, x, res), "chain-same": chain_fn(layers, x, res, same)}
    variants |= {variant: block_fn(layers, x, res, plan) for variant, plan in plans.items()}
    reference = variants["chain"]()
    rows = []
    for variant, fn in variants.items():
        diff = (fn().float() - reference.float()).abs().max().item()
        ms = graph_time_us(fn, reps=10, warmup=2, flush=False)["median_us"] / 1e3
        rows.append({"model": name, "m": m, "variant": variant, "layers": len(layers), "ms": round(ms, 4),
                     "us_per_layer": round(ms * 1e3 / len(layers), 2), "weight_gb": round(gb, 4),
                     "floor_over_time": round(gb / bw * 1e3 / ms, 3), "max_abs_diff_vs_chain": diff,
                     "plan": str(plans.get(variant, ""))})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-1.7b,qwen3-4b,qwen3-8b")
    p.add_argument("--m", default="32,64", help="rows of the activations (the graph's padded batch)")
    p.add_argument("--programs", default="1,2,3,4", help="programs per SM of the block variants")
    p.add_argument("--layers", type=int, default=0, help="layers per stack (default: the model's)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    require_cuda()
    from sparrow_sgl.hardware import get_model_shape

    info, bw = device_info(), copy_bandwidth_gbs()
    rows = []
    for name in args.models.split(","):
        shape = get_model_shape(name)
        layers = make_layers(shape, args.layers or shape.num_layers)
        for m in parse_ints(args.m):
            rows += measure(name, m, layers, parse_ints(args.programs), bw)
        del layers
        torch.cuda.empty_cache()
    return emit("mlp_block", {"kind": "mlp_block", **info, "copy_bw_gbs": bw, "rows": rows}, args.out_dir)


if __name__ == "__main__":
    main()
