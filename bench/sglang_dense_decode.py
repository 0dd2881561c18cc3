"""Dense decode layers of the SGLang `sparrow` backend: SGLang's FlashInfer configuration vs the Triton decode kernel.

The backend delegates its dense layers (and every layer of an all-dense batch) to SGLang's stock FlashInfer backend:
a `BatchDecodeWithPagedKVCacheWrapper` over SGLang's NHD KV pool ([pages, 16, kv_heads, D] views of
[slots, kv_heads, D]), tensor cores when the GQA group is >= 4 (`should_use_tensor_core` in SGLang 0.5.23's
flashinfer_backend), planned with one page list per request. This times one such layer against the project's Triton
decode kernel (`triton_attend_pages`, every page of each request) on the same NHD cache, and on the HND cache the
embedded engine uses, each as a CUDA-graph replay from a cold L2, at the issue-19 batches. Prints JSON rows
(`kind: sglang_dense_decode`); floor = K + V bytes / the copy bandwidth measured in the same run.

    python -m bench.sglang_dense_decode --contexts 2k,8k,32k
"""

from __future__ import annotations

import argparse
import math

import torch

from bench.common import copy_bandwidth_gbs, device_info, emit, graph_time_us, parse_ints, require_cuda

PAGE = 16
SHAPES = {"qwen3-1.7b": (34, 16, 8, 128), "qwen3-4b": (25, 32, 8, 128), "qwen3-8b": (24, 32, 8, 128)}  # batch, heads


def sglang_wrapper(batch: int, pages: int, group: int):
    """The decode wrapper as SGLang 0.5.23 builds it for CUDA-graph decode (NHD, its tensor-core rule)."""
    import flashinfer

    buffers = {"paged_kv_indptr_buffer": torch.zeros(batch + 1, dtype=torch.int32, device="cuda"),
               "paged_kv_indices_buffer": torch.zeros(batch * pages, dtype=torch.int32, device="cuda"),
               "paged_kv_last_page_len_buffer": torch.zeros(batch, dtype=torch.int32, device="cuda")}
    workspace = torch.zeros(512 * 2**20, dtype=torch.uint8, device="cuda")
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_cuda_graph=True,
                                                         use_tensor_cores=group >= 4, **buffers)


def layer_rows(model: str, context: int, bw: float, reps: int) -> list[dict]:
    from sparrow_sgl.attention.kernels.triton_decode import triton_attend_pages
    from sparrow_sgl.config import SparsityConfig

    batch, q_heads, kv_heads, head_dim = SHAPES[model]
    n_pages = math.ceil(context / PAGE)
    pool = batch * n_pages + 1
    k_nhd = torch.randn(pool, PAGE, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    v_nhd = torch.randn_like(k_nhd)
    block_table = (torch.randperm(pool - 1, device="cuda")[: batch * n_pages] + 1).view(batch, n_pages).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, q_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    wrapper = sglang_wrapper(batch, n_pages, q_heads // kv_heads)
    indptr = torch.arange(0, batch * n_pages + 1, n_pages, dtype=torch.int32, device="cuda")
    last_len = torch.full((batch,), context - (n_pages - 1) * PAGE, dtype=torch.int32, device="cuda")
    wrapper.plan(indptr, block_table.reshape(-1), last_len, q_heads, kv_heads, head_dim, PAGE,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=head_dim**-0.5)
    pages = torch.arange(n_pages, dtype=torch.int32, device="cuda")[None, None, :].expand(batch, 1, -1)
    counts = torch.full((batch, 1), n_pages, dtype=torch.int32, device="cuda")
    runs = {"flashinfer-sglang-nhd": lambda: wrapper.run(q, (k_nhd, v_nhd)),
            "triton-nhd": lambda: triton_attend_pages(q, k_nhd, v_nhd, block_table, seq_lens, pages, counts,
                                                      SparsityConfig(page_size=PAGE, kv_layout="NHD"))}
    k_hnd, v_hnd = k_nhd.transpose(1, 2).contiguous(), v_nhd.transpose(1, 2).contiguous()
    runs["triton-hnd"] = lambda: triton_attend_pages(q, k_hnd, v_hnd, block_table, seq_lens, pages, counts,
                                                     SparsityConfig(page_size=PAGE, kv_layout="HND"))
    ref = runs["flashinfer-sglang-nhd"]().float()
    kv_bytes = batch * context * kv_heads * head_dim * 2 * 2
    rows = []
    for name, fn in runs.items():
        err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
        us = graph_time_us(fn, reps=reps)["median_us"]
        rows.append({"kind": "sglang_dense_decode", "model": model, "batch": batch, "context": context,
                     "kernel": name, "layer_us": round(us, 2), "floor_us": round(kv_bytes / bw / 1e3, 2),
                     "floor_over_time": round(kv_bytes / bw / 1e3 / us, 3), "max_rel_err_vs_flashinfer": err})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--contexts", default="2k,8k,32k")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--results-dir", default=None, help="where sglang_dense_decode.json is appended")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(SHAPES)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}: choose from {sorted(SHAPES)}")
    require_cuda()
    info, bw = device_info(), copy_bandwidth_gbs()
    rows = []
    for model in args.models.split(","):
        for context in parse_ints(args.contexts):
            for row in layer_rows(model, context, bw, args.reps):
                rows.append(emit("sglang_dense_decode", {**row, "gpu": info.get("gpu"), "copy_bw_gbs": bw,
                                                         "date": info["date"]}, args.results_dir))
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
