"""Registers, spills and shared memory of the compiled decode kernels (one line of JSON per compiled variant).

`step_kernel_resources()` reads what this process compiled for the decode step's Triton kernels (`decode_e2e
--profile` stores it in its record). Alone, it compiles the decode kernel for a Qwen3-4B-shaped
sparse step (batch 25, 8 KV heads, group 4) under each SPARROW_DECODE_STAGES / SPARROW_DECODE_PREFETCH setting and
with SPARROW_DECODE_WARPS=8.
    python -m bench.kernel_resources
"""

from __future__ import annotations

import json
import os

import torch


def compiled_resources(jit_fn) -> list[dict]:
    """What Triton's cache holds for `jit_fn`: per compiled kernel, its constants and resource use. A kernel that was
    compiled but cannot load on this GPU (e.g. a GEMM tile a tuning sweep tried, over the shared memory) is listed
    with "fits": false and no register counts."""
    from triton.runtime.errors import OutOfResources

    rows = []
    for cache in getattr(jit_fn, "device_caches", {}).values():
        for kernel in cache[0].values():
            meta = kernel.metadata
            try:
                kernel._init_handles()
            except OutOfResources:
                rows.append({"kernel": jit_fn.__name__, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
                             "shared_bytes": meta.shared, "fits": False})
                continue
            rows.append({"kernel": jit_fn.__name__, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
                         "shared_bytes": meta.shared, "registers": kernel.n_regs, "spills": kernel.n_spills,
                         "max_programs_per_sm": occupancy(meta.num_warps, kernel.n_regs, meta.shared)})
    return rows


STEP_KERNELS = (  # (module, Triton kernel) of a decode step's launches
    ("sparrow_sgl.attention.kernels.triton_decode", "_sparse_decode_kernel"),
    ("sparrow_sgl.attention.kernels.triton_decode", "_merge_splits_kernel"),
    ("sparrow_sgl.attention.kernels.triton_select", "_score_pages_kernel"),
    ("sparrow_sgl.attention.kernels.triton_select", "_topk_pages_kernel"),
    ("sparrow_sgl.attention.kernels.triton_select", "_select_pages_kernel"),
    ("sparrow_sgl.attention.kernels.triton_linear", "_linear_kernel"),
    ("sparrow_sgl.attention.kernels.triton_qkv_append", "_qkv_append_decode_kernel"),
    ("sparrow_sgl.attention.kernels.triton_fused", "_add_rms_norm_kernel"),
)


def step_kernel_resources() -> list[dict]:
    """`compiled_resources` of every decode-step kernel compiled in this process (none without a GPU)."""
    import importlib

    if not torch.cuda.is_available():
        return []
    rows = []
    for module, name in STEP_KERNELS:
        rows += compiled_resources(getattr(importlib.import_module(module), name))
    return rows


def occupancy(num_warps: int, registers: int, shared: int) -> int:
    """Resident programs per SM on a Hopper SM (64K registers, 228 KB shared memory, 32 blocks, 64 warps)."""
    props = torch.cuda.get_device_properties(0)
    by_regs = 65536 // max(registers * 32 * num_warps, 1)
    by_smem = (getattr(props, "shared_memory_per_multiprocessor", 233472)) // max(shared + 1024, 1)
    return min(by_regs, by_smem, 32, 64 // num_warps)


def main() -> None:
    from sparrow_sgl.attention import PageSummaries, select_pages
    from sparrow_sgl.attention.kernels import triton_decode
    from sparrow_sgl.config import SparsityConfig

    cfg = SparsityConfig(kv_layout="HND")
    batch, kv_heads, group, pages = 25, 8, 4, 2048
    k = torch.randn(batch * pages, kv_heads, 16, 128, dtype=torch.bfloat16, device="cuda")
    block_table = torch.arange(batch * pages, dtype=torch.int32, device="cuda").view(batch, pages)
    seq_lens = torch.full((batch,), pages * 16, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, kv_heads * group, 128, dtype=torch.bfloat16, device="cuda")
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    selection = select_pages(q, summaries, block_table, seq_lens, 6144, cfg)
    counts = selection.valid.sum(-1).to(torch.int32)
    for stages, prefetch, warps in [(s, p, "4") for s in "123" for p in "01"] + [("2", "1", "8")]:
        os.environ[triton_decode.STAGES_ENV], os.environ[triton_decode.PREFETCH_ENV] = stages, prefetch
        os.environ[triton_decode.DECODE_WARPS_ENV] = warps
        triton_decode.triton_attend_pages(q, k, k, block_table, seq_lens, selection.pages.int(), counts, cfg)
    for row in compiled_resources(triton_decode._sparse_decode_kernel):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
