"""A decoder layer's work after attention as one persistent launch (`triton_mlp_block.py`) vs the launches the engine
runs today, over a model's layers with distinct weights (as in a decode step: no weight stays in L2), each captured
in one CUDA graph and timed by replay.

Two spans: `mlp` = the post-attention add + RMSNorm, gate_up, and down with SiLU x up in its load (3 launches today);
`after` = o_proj, that, then the next layer's add + RMSNorm and qkv projection (6 launches today; the span of
SPARROW_LAYER_BLOCK=chain). Variants per span: `chain` (the engine's kernels: `engine.linear.Linear` picks cuBLAS or
a Triton tile per shape, from the shipped table on an H200), `chain-same` (mlp only: the chain on the block's own
tiles, what persistence alone changes) and `block-<tile>-<P>x` (the block with its GEMM tiles
block_n x block_k x stages and P programs per SM). Rows: ms for the stack,
us per layer, weight GB, floor / time (weight bytes at the measured copy bandwidth), and the largest difference of
layer 0's output from the chain's.

    python -m bench.mlp_block --models qwen3-1.7b,qwen3-4b,qwen3-8b --m 32,64 --programs 2,3,4 --tiles 64x64x3
"""

from __future__ import annotations

import argparse

import torch

from bench.common import copy_bandwidth_gbs, device_info, emit, graph_time_us, parse_ints, require_cuda

EPS = 1e-6


def make_layers(shape, layers: int, device: str = "cuda") -> list[dict]:
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim

    def w(*size):
        return 0.02 * torch.randn(*size, device=device, dtype=torch.bfloat16)

    def norm():
        return (1 + 0.1 * torch.randn(h, device=device)).to(torch.bfloat16)

    return [{"norm": norm(), "gate_up": w(2 * i, h), "down": w(h, i), "o": w(h, q), "next_norm": norm(),
             "qkv": w(q + 2 * kv, h)} for _ in range(layers)]


def module(weight: torch.Tensor):
    """The engine's Linear over `weight` (its auto choice: cuBLAS or a Triton tile)."""
    from sparrow_sgl.engine.linear import Linear

    mod = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    mod.weight = torch.nn.Parameter(weight, requires_grad=False)
    return mod


def stack(layer_fn, layers: list):
    """The callable timed: layer_fn over every layer in order; returns layer 0's output (compared across variants)."""
    def run() -> torch.Tensor:
        return [layer_fn(layer) for layer in layers][0]

    return run


def chain_fn(layers: list[dict], x: torch.Tensor, res: torch.Tensor, plan=None):
    """The engine's three launches per layer; plan: force the block's tiles (`chain-same`), else the engine's pick."""
    from sparrow_sgl.attention.kernels.triton_linear import linear
    from sparrow_sgl.engine import fused

    mods = [(layer["norm"], module(layer["gate_up"]), module(layer["down"])) for layer in layers]

    def layer(norm, gu, down) -> torch.Tensor:
        h, _ = fused.add_rms_norm(x, res, norm, EPS)
        if plan is None:
            return down.forward_silu_mul(gu(h))
        return linear(linear(h, gu.weight, None, plan.gate_up), down.weight, None, plan.down, silu_input=True)

    return stack(lambda mod: layer(*mod), mods)


def block_fn(layers: list[dict], x: torch.Tensor, res: torch.Tensor, plan):
    from sparrow_sgl.attention.kernels.triton_mlp_block import mlp_block

    return stack(lambda layer: mlp_block(x, res, layer["norm"], EPS, layer["gate_up"], layer["down"], plan)[0],
                 layers)


def after_chain_fn(layers: list[dict], attn: torch.Tensor, res: torch.Tensor):
    """o_proj, add + norm, MLP, add + the next norm, qkv: the engine's six launches per layer."""
    from sparrow_sgl.engine import fused

    mods = [layer | {k: module(layer[k]) for k in ("o", "gate_up", "down", "qkv")} for layer in layers]

    def layer(mod: dict) -> torch.Tensor:
        h, s = fused.add_rms_norm(mod["o"](attn), res, mod["norm"], EPS)
        h2, _ = fused.add_rms_norm(mod["down"].forward_silu_mul(mod["gate_up"](h)), s, mod["next_norm"], EPS)
        return mod["qkv"](h2)

    return stack(layer, mods)


def after_block_fn(layers: list[dict], attn: torch.Tensor, res: torch.Tensor, plan):
    from sparrow_sgl.attention.kernels.triton_mlp_block import NextLayer, layer_block

    def layer(w: dict) -> torch.Tensor:
        return layer_block(attn, w["o"], res, w["norm"], EPS, w["gate_up"], w["down"],
                           NextLayer(w["next_norm"], EPS, w["qkv"]), plan)[0]

    return stack(layer, layers)


def time_variants(variants: dict, plans: dict, common: dict, gb: float, bw: float, n_layers: int) -> list[dict]:
    """One row per variant: graph-replay time of the stack and layer 0's largest difference from the first."""
    reference = next(iter(variants.values()))()
    rows = []
    for variant, fn in variants.items():
        diff = (fn().float() - reference.float()).abs().max().item()
        ms = graph_time_us(fn, reps=10, warmup=2, flush=False)["median_us"] / 1e3
        rows.append({**common, "variant": variant, "layers": n_layers, "ms": round(ms, 4),
                     "us_per_layer": round(ms * 1e3 / n_layers, 2), "weight_gb": round(gb, 4),
                     "floor_over_time": round(gb / bw * 1e3 / ms, 3), "max_abs_diff_vs_chain": diff,
                     "plan": str(plans.get(variant, ""))})
        print(rows[-1], flush=True)
    return rows


def measure(name: str, m: int, layers: list[dict], programs: list[int], tiles: list[tuple], bw: float) -> list[dict]:
    from sparrow_sgl.attention.kernels.triton_linear import num_sms
    from sparrow_sgl.attention.kernels.triton_mlp_block import default_plan

    h, i = layers[0]["down"].shape
    device = layers[0]["down"].device
    x = torch.randn(m, h, device=device, dtype=torch.bfloat16)
    res = torch.randn(m, h, device=device, dtype=torch.bfloat16)
    gb = len(layers) * 3 * h * i * 2 / 1e9
    sms = num_sms(x.device)
    grid = [(f"block-{'x'.join(map(str, t))}-{p}x", t, p * sms) for t in tiles for p in programs]
    plans = {name: default_plan(m, h, i, x.device, n, tile=t) for name, t, n in grid}
    same = default_plan(m, h, i, x.device, tile=tiles[0])
    variants = {"chain": chain_fn(layers, x, res), "chain-same": chain_fn(layers, x, res, same)}
    variants |= {variant: block_fn(layers, x, res, plan) for variant, plan in plans.items()}
    rows = time_variants(variants, plans, {"model": name, "m": m, "span": "mlp"}, gb, bw, len(layers))
    q, n_qkv = layers[0]["o"].shape[1], layers[0]["qkv"].shape[0]
    attn = torch.randn(m, q, device=device, dtype=torch.bfloat16)
    plans = {name: default_plan(m, h, i, x.device, n, q_size=q, qkv_size=n_qkv, tile=t) for name, t, n in grid}
    variants = {"chain": after_chain_fn(layers, attn, res)}
    variants |= {variant: after_block_fn(layers, attn, res, plan) for variant, plan in plans.items()}
    gb_after = gb + len(layers) * (h * q + n_qkv * h) * 2 / 1e9
    return rows + time_variants(variants, plans, {"model": name, "m": m, "span": "after"}, gb_after, bw, len(layers))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-1.7b,qwen3-4b,qwen3-8b")
    p.add_argument("--m", default="32,64", help="rows of the activations (the graph's padded batch)")
    p.add_argument("--programs", default="2,3,4", help="programs per SM of the block variants")
    p.add_argument("--tiles", default="64x64x3,32x128x3,64x128x2",
                   help="block_n x block_k x stages of the block's GEMM tiles (the first also for chain-same)")
    p.add_argument("--layers", type=int, default=0, help="layers per stack (default: the model's)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    require_cuda()
    from sparrow_sgl.hardware import get_model_shape

    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    if any(len(t) != 3 for t in tiles):
        p.error(f"--tiles {args.tiles!r}: give block_n x block_k x stages, e.g. 64x64x3")
    info, bw = device_info(), copy_bandwidth_gbs()
    rows = []
    for name in args.models.split(","):
        shape = get_model_shape(name)
        layers = make_layers(shape, args.layers or shape.num_layers)
        for m in parse_ints(args.m):
            rows += measure(name, m, layers, parse_ints(args.programs), tiles, bw)
        del layers
        torch.cuda.empty_cache()
    return emit("mlp_block", {"kind": "mlp_block", **info, "copy_bw_gbs": bw, "rows": rows}, args.out_dir)


if __name__ == "__main__":
    main()
