"""What a kernel boundary costs a bandwidth-bound chain, against a grid barrier inside one persistent kernel.

    python -m bench.launch_boundary [--phase-mb 2,8,32,128 --total-mb 2048 --programs-per-sm 1,2]

A decode step is ~470 short, bandwidth-bound launches, and each carries a few microseconds of ramp and tail over
its bytes floor (bench/results/NOTES.md, sessions 8-10). A persistent decode layer would replace most boundaries by
grid barriers. This measures both on the same streaming work (a phase reads `phase-mb` of bf16 "weights"; the
phases are independent, as weight streams are): one CUDA graph of N launches, one per phase (`chain`); one launch
whose programs stream every phase with a grid barrier between phases (`barrier`), and the same with each program
loading its first tile of the next phase before the barrier (`barrier+prefetch`); and one launch streaming every
phase without any barrier (`no-sync`, the streaming floor of this kernel). Each run starts from a cold L2.
Prints one JSON object: time, GB/s and the cost per boundary (time over `no-sync`, divided by the phases).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from bench.common import capture_graph, device_info, require_cuda, time_us

MAX_WARPS_PER_SM = 16  # all programs stay resident (a 2 x 8-warp grid ran; 4 x 8 hung on the H200)
BLOCK, UNROLL, WARPS = 2048, 4, 4  # elements per load, independent loads in flight per iteration, warps per program


@triton.jit
def _stream(base, lo, hi, acc, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK * UNROLL):
        for u in tl.static_range(UNROLL):
            idx = start + u * BLOCK + offs
            acc += tl.load(base + idx, mask=idx < hi, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _phase_kernel(src, out, n, span, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """One phase: program p reads src[p * span : (p + 1) * span]."""
    pid = tl.program_id(0)
    lo = pid * span
    acc = _stream(src, lo, tl.minimum(lo + span, n), tl.zeros([BLOCK], tl.float32), BLOCK, UNROLL)
    tl.store(out + pid * BLOCK + tl.arange(0, BLOCK), acc)


@triton.jit
def _grid_barrier(bar_ptr, target):
    """Every program of the grid has arrived `target` times in all (a counter that only grows within a launch)."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release")
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _persistent_kernel(src, out, n, span, phases, bar_ptr, BARRIER: tl.constexpr, PREFETCH: tl.constexpr,
                       BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    lo = pid * span
    hi = tl.minimum(lo + span, n)
    acc = tl.zeros([BLOCK], tl.float32)
    first = tl.load(src + lo + offs, mask=lo + offs < hi, other=0.0)
    for phase in range(phases):
        base = src + phase * n  # < 2^31 elements in all (--total-mb <= 4096)
        if PREFETCH:  # this phase's first tile came before the barrier
            acc += first.to(tl.float32)
            acc = _stream(base, lo + BLOCK, hi, acc, BLOCK, UNROLL)
            if phase + 1 < phases:
                first = tl.load(base + n + lo + offs, mask=lo + offs < hi, other=0.0)
        else:
            acc = _stream(base, lo, hi, acc, BLOCK, UNROLL)
        if BARRIER:
            _grid_barrier(bar_ptr, (phase + 1) * programs)
    tl.store(out + pid * BLOCK + offs, acc)
    if BARRIER:  # the last program out resets the counters for the next launch (graph replay)
        done = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel")
        if done == programs - 1:
            tl.store(bar_ptr, 0)
            tl.store(bar_ptr + 1, 0)


def measure(src: torch.Tensor, phase_elems: int, phases: int, programs: int, block: int = BLOCK,
            unroll: int = UNROLL, warps: int = WARPS) -> dict:
    span = triton.cdiv(triton.cdiv(phase_elems, programs), block) * block
    out = torch.empty(programs * block, dtype=torch.float32, device="cuda")
    bar = torch.zeros(2, dtype=torch.int32, device="cuda")
    shape = dict(BLOCK=block, UNROLL=unroll, num_warps=warps)

    def chain():
        for p in range(phases):
            _phase_kernel[(programs,)](src[p * phase_elems :], out, phase_elems, span, **shape)

    def persistent(barrier: bool, prefetch: bool):
        def run():
            _persistent_kernel[(programs,)](src, out, phase_elems, span, phases, bar, BARRIER=barrier,
                                            PREFETCH=prefetch, **shape)
        return run

    runs = {"chain": chain, "no-sync": persistent(False, False), "barrier": persistent(True, False),
            "barrier+prefetch": persistent(True, True)}
    bytes_read = phases * phase_elems * 2
    row = {"phase_mb": round(phase_elems * 2 / 2**20, 3), "phases": phases, "programs": programs, "block": block,
           "unroll": unroll, "warps": warps}
    for name, fn in runs.items():
        graph = capture_graph(fn)
        t = time_us(graph.replay, reps=10, warmup=2)["median_us"]
        row[name] = {"us": t, "gb_s": round(bytes_read / t / 1e3, 1)}
    floor = row["no-sync"]["us"]
    for name in ("chain", "barrier", "barrier+prefetch"):
        row[name]["us_per_boundary"] = round((row[name]["us"] - floor) / phases, 3)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase-mb", default="2,8,32,128", help="MiB each phase reads, comma-separated")
    p.add_argument("--total-mb", type=int, default=2048, help="MiB all phases read together")
    p.add_argument("--programs-per-sm", default="1,2")
    p.add_argument("--tiles", default=f"{BLOCK}x{UNROLL}x{WARPS}",
                   help="elements per load x loads per iteration x warps, comma-separated, e.g. 2048x4x4,4096x4x8")
    args = p.parse_args(argv)
    if not 0 < args.total_mb < 4096:
        raise SystemExit("--total-mb must lie in (0, 4096) MiB (element offsets are 32-bit)")
    tiles = [tuple(int(v) for v in tile.split("x")) for tile in args.tiles.split(",")]
    per_sms = [int(x) for x in args.programs_per_sm.split(",")]
    if any(len(t) != 3 for t in tiles):
        raise SystemExit(f"--tiles {args.tiles!r}: each tile is BLOCKxUNROLLxWARPS, e.g. 2048x4x4")
    if max(per_sms) * max(t[2] for t in tiles) > MAX_WARPS_PER_SM:  # a barrier over non-resident programs hangs
        raise SystemExit(f"--programs-per-sm x warps must stay <= {MAX_WARPS_PER_SM} warps per SM: the barrier "
                         "runs would wait forever for programs never scheduled")
    require_cuda()
    total = args.total_mb * 2**20 // 2
    src = torch.randn(total, device="cuda").to(torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for mb in (float(x) for x in args.phase_mb.split(",")):
        phase_elems = int(mb * 2**20) // 2
        for per_sm in per_sms:
            for block, unroll, warps in tiles:
                rows.append(measure(src, phase_elems, total // phase_elems, per_sm * sms, block, unroll, warps))
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"bench": "launch_boundary", **device_info(), "total_mb": args.total_mb, "rows": rows},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
