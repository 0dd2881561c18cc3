"""Kernel time of one engine decode step by kernel class (`python -m bench.decode_e2e --profile`).

torch.profiler over CUDA-graph replays of the step `bench.decode_e2e` times: every kernel of a replay is recorded
with its device time, named into a class, and summed per step. Attention kernels are split into dense-layer and
sparse attention by what ran before them in the layer: an attention kernel after a scoring / top-k launch (since
the layer's KV append) serves a sparse layer, one without serves a dense layer (the dense layers of a sparse step,
and every layer of a dense step). Each class of bytes-bound work also gets its bytes floor at the measured copy
bandwidth (GEMMs: the weights; attention: the K/V read; scoring: the page summaries read), so a class's share and
its distance from its floor are both in the JSON (`bench/results/decode_profile.json`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

CLASSES = ("dense_attention", "sparse_attention", "page_scoring", "topk", "gemm", "fused_elementwise",
           "kv_append", "other")
_RULES = (  # (class, lower-case name fragments); first match wins. "attention" is split by `classify`.
    ("kv_append", ("_qkv_append_decode_kernel", "_append_kv_decode_kernel", "_append_decode_kernel")),
    ("page_scoring", ("_score_pages_kernel", "_select_pages_kernel", "_score_heads_kernel")),  # one-launch: + top-k
    ("topk", ("_topk_pages_kernel", "topk", "radix", "sort")),
    ("fused_elementwise", ("_add_rms_norm_kernel", "_qk_norm_rope_kernel", "_silu_mul_kernel")),
    ("attention", ("_sparse_decode_kernel", "_merge_splits_kernel", "batchdecode", "mergestate", "flashinfer")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "splitk", "gemv", "cublas", "_linear_kernel")),
)
_SELECTION = ("page_scoring", "topk")


def kernel_class(name: str) -> str:
    """The class of one kernel name ('attention' for both attention kinds; `classify` splits them)."""
    low = name.lower()
    return next((cls for cls, frags in _RULES if any(f in low for f in frags)), "other")


def classify(names: list[str]) -> list[str]:
    """Classes of a time-ordered kernel stream (one or more decode steps, each layer: append, [select], attend)."""
    out, selected = [], False
    for name in names:
        cls = kernel_class(name)
        if cls == "kv_append":
            selected = False
        elif cls in _SELECTION:
            selected = True
        elif cls == "attention":
            cls = "sparse_attention" if selected else "dense_attention"
        out.append(cls)
    return out


@dataclass(slots=True)
class StepBytes:
    """Bytes one decode step must read per class (what the floors are computed from)."""

    gemm: float
    dense_attention: float
    sparse_attention: float
    page_scoring: float


def step_bytes(shape, batch: int, context: int, budget: int | None, dense_layers: int, summary_bytes: int,
               page: int = 16) -> StepBytes:
    """Weights of every matmul, K + V of the attended tokens, summaries of every page of the sparse layers."""
    kv_token = 2 * shape.num_kv_heads * shape.head_dim * 2  # K and V, bf16
    sparse_layers = 0 if budget is None else shape.num_layers - dense_layers
    dense_count = shape.num_layers - sparse_layers
    attended = context if budget is None else min(budget, context)
    pages = -(-context // page)
    return StepBytes(
        gemm=2.0 * shape.matmul_params,
        dense_attention=float(dense_count * batch * context * kv_token),
        sparse_attention=float(sparse_layers * batch * attended * kv_token),
        page_scoring=float(sparse_layers * batch * pages * shape.num_kv_heads * shape.head_dim * summary_bytes),
    )


def summarize_kernels(kernels: list[tuple[str, float]], steps: int, floors_ms: dict[str, float] | None = None,
                      top: int = 3) -> dict:
    """Per-step ms, launches and share by class from (name, device us) of `steps` replays, in time order."""
    classes = classify([name for name, _ in kernels])
    total_us = sum(us for _, us in kernels)
    by_class: dict[str, dict] = {}
    for cls in CLASSES:
        picked = [(n, us) for (n, us), c in zip(kernels, classes) if c == cls]
        us = sum(t for _, t in picked)
        names: dict[str, float] = {}
        for n, t in picked:
            names[n[:96]] = names.get(n[:96], 0.0) + t
        entry = {"ms": round(us / steps / 1e3, 4), "launches": len(picked) // steps,
                 "share": round(us / total_us, 4) if total_us else 0.0,
                 "top_kernels": {n: round(t / steps / 1e3, 4) for n, t in
                                 sorted(names.items(), key=lambda kv: -kv[1])[:top]}}
        floor = (floors_ms or {}).get(cls)
        if floor is not None:
            entry |= {"floor_ms": round(floor, 4), "floor_over_time": round(floor / entry["ms"], 3) if us else None}
        by_class[cls] = entry
    return {"kernel_ms": round(total_us / steps / 1e3, 4), "launches": len(kernels) // steps, "classes": by_class}


def profile_kernels(fn, steps: int) -> list[tuple[str, float]]:
    """(kernel name, device us) of every kernel, memcpy and memset that `steps` calls of fn ran, in start order."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    device.sort(key=lambda e: float(e["ts"]))
    return [(str(e["name"]), float(e["dur"])) for e in device]


def profile_record(info: dict, bw_gbs: float, rows: list[dict], resources: list[dict] | None = None) -> dict:
    """The JSON record of one profile run (what `decode_profile.json` holds a list of); `resources`: registers,
    shared memory and resident programs per SM of the Triton kernels compiled (`bench.kernel_resources`)."""
    return {"kind": "decode_profile", "gpu": info.get("gpu"), "date": info.get("date"), "torch": info.get("torch"),
            "triton": info.get("triton"), "flashinfer": info.get("flashinfer"), "copy_bw_gbs": bw_gbs,
            "classes": list(CLASSES), "rows": rows, "resources": resources or []}


def floors_ms(nbytes: StepBytes, bw_gbs: float) -> dict[str, float]:
    scale = 1e3 / (bw_gbs * 1e9)
    return {"gemm": nbytes.gemm * scale, "dense_attention": nbytes.dense_attention * scale,
            "sparse_attention": nbytes.sparse_attention * scale, "page_scoring": nbytes.page_scoring * scale}


def print_profile(rows: list[dict]) -> None:
    print("\nkernel ms per step by class (graph replays under torch.profiler); floor = bytes / copy bandwidth")
    head = " ".join(f"{c[:12]:>12}" for c in CLASSES)
    print(f"{'model':11} {'variant':28} {'ctx':>6} {'step ms':>8} {'kern ms':>8} {head}")
    for r in rows:
        cells = " ".join(f"{r['classes'][c]['ms']:>12}" for c in CLASSES)
        print(f"{r['model']:11} {r['variant']:28} {r['context']:>6} {r['step_ms']:>8} {r['kernel_ms']:>8} {cells}")
