"""Does prefetching a layer's small weights into L2 during its latency-bound kernels shorten the decode step?

    python -m bench.l2_prefetch [--models qwen3-4b --m 32 --kv-mb 0,80,600 --layers 12]

A sparse decode layer runs latency-bound kernels (top-k ~10 us, the split merge, norms) between bandwidth-bound
ones, and each small-M GEMM carries 3-5 us of ramp and tail over its weight bytes (o_proj of a 4B layer: 9.7 us
for a 4.9 us floor; bench/results/NOTES.md). If the top-k launch also issued L2 prefetches of the o_proj weights
(and the next layer's qkv weights), the DRAM would stream them while it is otherwise idle and the GEMMs would read
L2. This times that on a stand-in layer, as one CUDA graph over `layers` layers with distinct weights, cold L2:
a spin kernel of `spin-us` (the top-k; with the prefetch in it, or not), a streaming read of `kv-mb` MB (the
sparse decode's KV; plain loads or evict-first), then the engine's GEMMs (`engine.linear.Linear`, its choice per
shape): o, gate_up, SiLU x up, down, and the next layer's qkv. Prints one JSON line per row: microseconds per layer
and the saving over the same row without prefetch.

Measured (session 16, NVIDIA H200, `bench/results/NOTES.md`): the prefetch never helped; layers ran 0.2-15 us slower.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton
import triton.language as tl

from bench.common import device_info, graph_time_us, parse_ints, require_cuda
from bench.gemm_small_m import layer_shapes

LINE = 128  # bytes per L2 prefetch
SPIN_PROGRAMS, STREAM_BLOCK = 264, 4096
TARGETS = ("none", "o", "o+qkv")


@triton.jit
def _globaltimer(dummy):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _prefetch(base, nbytes, pid, programs, BLOCK: tl.constexpr):
    """L2 prefetch (evict-last) of base[0:nbytes], lines split over the programs; returns 0 (keeps the asm live)."""
    lines = tl.cdiv(nbytes, 128)
    done = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, lines, programs * BLOCK):
        line = tl.minimum(start + tl.arange(0, BLOCK), lines - 1).to(tl.int64)
        done += tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
                                          [base + line * 128], dtype=tl.int32, is_pure=False, pack=1)
    return tl.sum(done, 0)


@triton.jit
def _spin_prefetch_kernel(a, a_bytes, b, b_bytes, out, spin_ns, PREFETCH: tl.constexpr, BLOCK: tl.constexpr):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    done = 0
    if PREFETCH:
        done += _prefetch(a, a_bytes, pid, programs, BLOCK)
        done += _prefetch(b, b_bytes, pid, programs, BLOCK)
    start = _globaltimer(pid)
    while _globaltimer(pid) - start < spin_ns:
        done += 1
    tl.store(out + pid, done)


@triton.jit
def _stream_kernel(src, out, n, span, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr):
    pid = tl.program_id(0)
    lo = pid * span
    hi = tl.minimum(lo + span, n)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        if EVICT_FIRST:
            acc += tl.load(src + idx, mask=idx < hi, other=0.0, eviction_policy="evict_first").to(tl.float32)
        else:
            acc += tl.load(src + idx, mask=idx < hi, other=0.0).to(tl.float32)
    tl.store(out + pid, tl.sum(acc, 0))


def _bytes_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    return t.view(torch.uint8).view(-1), t.numel() * t.element_size()


def build_layers(shape, layers: int, device: torch.device) -> list[dict]:
    from sparrow_sgl.engine.linear import Linear

    dims = layer_shapes(shape)
    made = []
    for _ in range(layers + 1):  # layer i's forward ends with layer i + 1's qkv
        mods = {}
        for name, (n, k) in dims.items():
            mod = Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            torch.nn.init.normal_(mod.weight, std=0.02)
            mods[name] = mod
        made.append(mods)
    return made


def layer_step(mods: dict, nxt: dict, x: dict, kv, scratch, target: str, spin_ns: int, evict_first: bool) -> None:
    from sparrow_sgl.engine import fused

    a, a_bytes = _bytes_view(mods["o"].weight)
    b, b_bytes = _bytes_view(nxt["qkv"].weight)
    if target != "o+qkv":
        b_bytes = 0
    _spin_prefetch_kernel[(SPIN_PROGRAMS,)](a, a_bytes, b, b_bytes, scratch, spin_ns, PREFETCH=target != "none",
                                            BLOCK=256, num_warps=4)
    if kv is not None:
        n = kv.numel()
        programs = 4 * torch.cuda.get_device_properties(kv.device).multi_processor_count
        span = triton.cdiv(triton.cdiv(n, programs), STREAM_BLOCK) * STREAM_BLOCK
        _stream_kernel[(triton.cdiv(n, span),)](kv, scratch, n, span, BLOCK=STREAM_BLOCK, EVICT_FIRST=evict_first,
                                                num_warps=8)
    h = mods["o"](x["attn"])
    gate_up = mods["gate_up"](h)
    mods["down"](fused.silu_mul(gate_up))
    nxt["qkv"](h)


def stack_step(stack: list[dict], x: dict, kv, scratch, target: str, spin_ns: int, evict_first: bool) -> None:
    for i in range(len(stack) - 1):
        layer_step(stack[i], stack[i + 1], x, kv, scratch, target, spin_ns, evict_first)


def model_rows(model: str, args, scratch: torch.Tensor, gpu: str | None) -> None:
    from sparrow_sgl.hardware import MODEL_SHAPES

    shape, device = MODEL_SHAPES[model], scratch.device
    stack = build_layers(shape, args.layers, device)
    for m in parse_ints(args.m):
        x = {"attn": torch.randn(m, shape.num_heads * shape.head_dim, device=device, dtype=torch.bfloat16)}
        for mod in stack[0].values():  # the auto GEMM choice is made eagerly, outside capture
            mod(torch.randn(m, mod.in_features, device=device, dtype=torch.bfloat16))
        for kv_mb in parse_ints(args.kv_mb):
            kv = torch.randn(kv_mb << 19, device=device, dtype=torch.bfloat16) if kv_mb else None
            for evict_first in ((False, True) if kv_mb else (False,)):
                base = None
                for target in TARGETS:
                    step = functools.partial(stack_step, stack, x, kv, scratch, target, int(args.spin_us * 1e3),
                                             evict_first)
                    us = graph_time_us(step, reps=20)["median_us"] / args.layers
                    base = us if base is None else base
                    print(json.dumps({"bench": "l2_prefetch", "model": model, "m": m, "kv_mb": kv_mb,
                                      "evict_first": evict_first, "spin_us": args.spin_us, "target": target,
                                      "us_per_layer": round(us, 2), "saved_us": round(base - us, 2), "gpu": gpu}),
                          flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="qwen3-1.7b,qwen3-4b,qwen3-8b")
    p.add_argument("--m", default="32")
    p.add_argument("--kv-mb", default="0,80,600")
    p.add_argument("--spin-us", type=float, default=10.0)
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args(argv)
    if args.layers < 1 or args.spin_us < 0:
        p.error("--layers must be >= 1 and --spin-us >= 0")
    require_cuda()
    scratch = torch.zeros(1 << 16, dtype=torch.float32, device="cuda")
    gpu = device_info()["gpu"]
    for model in args.models.split(","):
        model_rows(model, args, scratch, gpu)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
