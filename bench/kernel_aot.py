"""Registers, spills, shared memory and resident programs per SM of a Triton kernel, compiled ahead of time for an
H100/H200 (sm_90a) on a machine without a GPU: Triton lowers to PTX and its bundled ptxas reports the resources.
For checking a kernel's occupancy before spending device time (`bench/results/NOTES.md`, sessions 12-13; the
decode kernel's count matched the H200's own). Pointers and the size / stride arguments get the launcher's
divisibility-by-16 hints, without which Triton cannot vectorise the loads and the counts mean nothing.

Use the Triton of the device (3.6 on the lent H200): `pip install --no-deps --target /tmp/tri36 triton==3.6.0`, then

    PYTHONPATH=/tmp/tri36 python -m bench.kernel_aot --kernel linear --tiles 64x128x3 --m 32,64

Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import tempfile

SM90_REGISTERS, SM90_SHARED, SM90_WARPS = 65536, 232448, 64


def compile_resources(jit_fn, constexprs: dict, arg_types: dict, divisible: set[str], num_warps: int = 4,
                      num_stages: int = 3, maxnreg: int | None = None) -> dict:
    """Resources of `jit_fn` compiled for sm_90a. arg_types: argument -> Triton type ("*bf16", "i32", "fp32"; any
    argument not named is "i32"); pointers and `divisible` integers are marked divisible by 16. maxnreg: the
    register cap a launch would pass (Triton's `maxnreg`), spilling what does not fit."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(jit_fn.fn).parameters)
    unknown = set(constexprs) - set(params)
    if unknown:
        raise ValueError(f"{jit_fn.__name__} has no arguments {sorted(unknown)}")
    signature = {p: "constexpr" if p in constexprs else arg_types.get(p, "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if p not in constexprs and (signature[p].startswith("*") or p in divisible)}
    source = ASTSource(fn=jit_fn, signature=signature, attrs=attrs,
                       constexprs={(params.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spill = re.search(r"(\d+) bytes spill stores", report)
    shared = kernel.metadata.shared
    per_sm = min(SM90_REGISTERS // (registers * 32 * num_warps), SM90_SHARED // max(shared + 1024, 1),
                 SM90_WARPS // num_warps)
    return {"kernel": jit_fn.__name__, "triton": triton.__version__, "num_warps": num_warps,
            "num_stages": num_stages, "registers": registers, "spill_bytes": int(spill.group(1)) if spill else 0,
            "shared_bytes": shared, "programs_per_sm": per_sm}


def linear_rows(tiles: list[tuple[int, int, int]], rows: list[int]) -> list[dict]:
    """`triton_linear._linear_kernel` (the small-M GEMM), plain and with the SiLU x up load of the down projection."""
    from sparrow_sgl.attention.kernels import triton_linear

    linear = triton_linear._linear_kernel
    linear_types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32",
                    "counter_ptr": "*i32"}
    linear_div = {"M", "N", "K", "stride_xm", "stride_wn", "stride_om", "k_per_split"}
    out = []
    for block_n, block_k, stages in tiles:
        for m in rows:
            block_m = max(16, 1 << (m - 1).bit_length())
            for silu in (False, True):
                const = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=True, HAS_BIAS=False,
                             SILU=silu, PDL=False, EARLY_W=False, F32_DOT=False)
                row = compile_resources(linear, const, linear_types, linear_div, 4, stages)
                out.append({**row, "span": "down+silu" if silu else "gemm", "m": m, "tile": [block_n, block_k, stages]})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="linear", choices=["linear"])
    p.add_argument("--tiles", default="64x64x3", help="block_n x block_k x stages, comma-separated")
    p.add_argument("--m", default="32", help="activation rows (the padded decode batch), comma-separated")
    args = p.parse_args(argv)
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    if any(len(t) != 3 for t in tiles):
        p.error(f"--tiles {args.tiles!r}: give block_n x block_k x stages, e.g. 64x64x3")
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 replaces the kernels with the interpreter's: unset it to compile")
    rows = linear_rows(tiles, [int(m) for m in args.m.split(",")])
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
