"""CPU checks of `decode_e2e --profile` (kernel-name classes, the JSON shape) and `--drain` (step curves, rows)."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest

from bench.decode_drain import StepCurves, drain_batches, drain_lengths, drain_summary
from bench.decode_e2e import append_rows, base_variant, is_what_if
from bench.decode_profile import CLASSES, classify, kernel_class, profile_record, step_bytes, summarize_kernels
from sparrow_sgl.config import Schedule
from sparrow_sgl.hardware import get_model_shape
from sparrow_sgl.schedule import load_preset

GEMM = "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT"
LAYER_DENSE = [GEMM, "_qk_norm_rope_kernel", "_append_kv_decode_kernel", "_sparse_decode_kernel",
               "_merge_splits_kernel", GEMM, "_add_rms_norm_kernel", GEMM, "_silu_mul_kernel", GEMM]
LAYER_SPARSE = [GEMM, "_qk_norm_rope_kernel", "_append_kv_decode_kernel", "_score_pages_kernel",
                "_topk_pages_kernel", "_sparse_decode_kernel", GEMM, "_add_rms_norm_kernel", GEMM]


def test_kernel_names_map_to_their_classes():
    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64") == "gemm"
    assert kernel_class("void cublasLt::splitKreduce_kernel<32, 16, int, float>") == "gemm"
    assert kernel_class("_linear_kernel") == "gemm"  # the small-M Triton GEMM (engine/linear.py)
    assert kernel_class("void flashinfer::BatchDecodeWithPagedKVCacheKernel<...>") == "attention"
    assert kernel_class("_select_pages_kernel") == "page_scoring"
    assert kernel_class("_append_decode_kernel") == "kv_append"
    assert kernel_class("_qkv_append_decode_kernel") == "kv_append"  # q/k norm + rotary fused into the append
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4, ...>") == "other"
    assert kernel_class("Memcpy DtoD (Device -> Device)") == "other"


def test_attention_after_a_selection_is_sparse_and_dense_otherwise():
    stream = LAYER_DENSE + LAYER_DENSE + LAYER_SPARSE + ["flashinfer::BatchDecodeWithPagedKVCacheKernel"]
    classes = classify(stream)
    attention = [c for n, c in zip(stream, classes) if kernel_class(n) == "attention"]
    assert attention == ["dense_attention"] * 4 + ["sparse_attention"] * 2  # FlashInfer after the sparse layer too
    assert classify(LAYER_SPARSE + LAYER_DENSE)[len(LAYER_SPARSE) + 3] == "dense_attention"  # append resets


def test_summary_per_step_and_floors_and_json_shape():
    kernels = [(n, 10.0) for n in (LAYER_DENSE + LAYER_SPARSE) * 2]  # two steps of two layers, 10 us each
    summary = summarize_kernels(kernels, steps=2, floors_ms={"gemm": 0.035})
    assert summary["kernel_ms"] == pytest.approx(len(LAYER_DENSE + LAYER_SPARSE) * 0.01)
    assert set(summary["classes"]) == set(CLASSES)
    assert sum(c["ms"] for c in summary["classes"].values()) == pytest.approx(summary["kernel_ms"])
    gemm = summary["classes"]["gemm"]
    assert gemm["launches"] == 7 and gemm["ms"] == pytest.approx(0.07) and gemm["floor_over_time"] == 0.5
    assert summary["classes"]["dense_attention"]["launches"] == 2
    assert summary["classes"]["sparse_attention"]["launches"] == 1
    record = profile_record({"gpu": "G", "date": "D", "torch": "T"}, 4000.0, [{"model": "m"} | summary])
    assert json.loads(json.dumps(record))["rows"][0]["classes"]["topk"]["launches"] == 1
    assert record["resources"] == []


def test_step_bytes_split_dense_and_sparse_layers():
    shape = get_model_shape("qwen3-4b")
    kv_token = 2 * shape.num_kv_heads * shape.head_dim * 2
    dense = step_bytes(shape, 4, 32768, None, 2, 2)
    assert dense.sparse_attention == 0 and dense.dense_attention == shape.num_layers * 4 * 32768 * kv_token
    sparse = step_bytes(shape, 4, 32768, 4096, 2, 2)
    assert sparse.dense_attention == 2 * 4 * 32768 * kv_token
    assert sparse.sparse_attention == (shape.num_layers - 2) * 4 * 4096 * kv_token
    assert sparse.page_scoring == (shape.num_layers - 2) * 4 * 2048 * shape.num_kv_heads * shape.head_dim * 2


def test_variant_names():
    assert is_what_if("sparse-triton-bf16c+fidense") and not is_what_if("sparse-triton-bf16c@0.80")
    assert base_variant("sparse-triton-bf16c@0.80+unfused") == "sparse-triton-bf16c"


def test_superseding_is_per_model_and_gpu(tmp_path):
    path = tmp_path / "rows.json"
    old = [{"kind": "decode_step", "model": "m", "gpu": g, "batch": 1, "context": 1, "step_ms": 1.0} for g in "AB"]
    append_rows(path, old)
    append_rows(path, [old[0] | {"step_ms": 2.0}], supersede=True)
    kinds = [(r["gpu"], r["kind"]) for r in json.loads(path.read_text())]
    assert kinds == [("A", "decode_step_superseded"), ("B", "decode_step"), ("A", "decode_step")]


def _step_rows(preset, batches=(8, 4, 1)):
    rows = []
    for b in batches:
        for ctx in (1024, 8192, 32768):
            shared = {"kind": "decode_step", "model": "qwen3-1.7b", "batch": b, "context": ctx}
            rows.append(shared | {"variant": "dense-triton", "budget": None, "schedule": "dense",
                                  "step_ms": 2.0 + b * ctx / 4000})
            rows.append(shared | {"variant": "sparse-triton", "budget": preset.budget_at(ctx),
                                  "schedule": preset.name, "step_ms": 2.2 + b * min(ctx, 4096) / 4000})
    return rows


def test_step_curves_interpolate_in_context_then_batch():
    preset = load_preset("qwen3-1.7b-0.86")
    curves = StepCurves(_step_rows(preset))
    ctx = np.array([1024.0, 4608.0, 32768.0])
    assert curves.step_ms(False, 8, ctx) == pytest.approx(2.0 + 8 * ctx / 4000)
    assert curves.step_ms(False, 6, ctx) == pytest.approx(2.0 + 6 * ctx / 4000)  # linear in batch: exact here
    assert drain_batches(34, 4) == [14, 6, 2, 1] and drain_batches(1, 4) == []
    lengths = drain_lengths(100, 1024, 32768)
    assert lengths.min() >= 1024 and lengths.max() <= 32768 and len(set(lengths.tolist())) > 50


def test_drain_summary_rows():
    preset = load_preset("qwen3-1.7b-0.86")
    dense = Schedule.dense(bin_tokens=preset.bin_tokens, dense_layers=list(preset.dense_layers))
    args = SimpleNamespace(drain_lengths="1k,32k", drain_requests=16, max_context=32768)
    (row,) = drain_summary("qwen3-1.7b", _step_rows(preset), [preset], dense, 8, args, {"model": "qwen3-1.7b"})
    assert row["kind"] == "decode_drain" and row["measured_batches"] == [1, 4, 8]
    assert 1 < row["speedup_drain"] < row["speedup_together"]  # the drained tail is weight-bound
    assert 1 < row["predicted_drain"] < row["predicted_together"]
    assert row["ratio_to_predicted_drain"] == pytest.approx(row["speedup_drain"] / row["predicted_drain"], abs=2e-3)


def test_drain_summary_reads_the_presets_scorer_only():
    """The engine under "centroid-bf16" writes decode_step rows of the same schedule name (faster here); the drained
    speedup of the preset is the shipped scorer's (call28 mixed them in: the bf16 rows, read last, won)."""
    preset = load_preset("qwen3-1.7b-0.86")
    dense = Schedule.dense(bin_tokens=preset.bin_tokens, dense_layers=list(preset.dense_layers))
    args = SimpleNamespace(drain_lengths="1k,32k", drain_requests=16, max_context=32768)
    shipped = _step_rows(preset)
    bf16 = [r | {"variant": "sparse-triton-bf16c", "scorer": "centroid-bf16", "step_ms": r["step_ms"] / 2}
            for r in shipped if r["budget"] is not None]
    tagged = [r | {"scorer": preset.scorer} if r["budget"] is not None else r for r in shipped]
    (want,) = drain_summary("qwen3-1.7b", shipped, [preset], dense, 8, args, {})
    (got,) = drain_summary("qwen3-1.7b", tagged + bf16, [preset], dense, 8, args, {})
    assert got["speedup_drain"] == want["speedup_drain"] and got["sparse_variant"] == "sparse-triton"


@pytest.mark.gpu
def test_profiler_sees_the_kernels_of_graph_replays():
    import torch

    from bench.common import capture_graph
    from bench.decode_profile import profile_kernels
    from sparrow_sgl.attention.kernels.triton_fused import add_rms_norm

    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    norm = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    graph = capture_graph(lambda: add_rms_norm(x @ w, None, norm, 1e-6))
    summary = summarize_kernels(profile_kernels(graph.replay, 3), steps=3)
    assert summary["classes"]["gemm"]["launches"] >= 1 and summary["classes"]["gemm"]["ms"] > 0
    assert summary["classes"]["fused_elementwise"]["launches"] == 1
    from bench.kernel_resources import step_kernel_resources

    norm_rows = [r for r in step_kernel_resources() if r["kernel"] == "_add_rms_norm_kernel"]
    assert norm_rows and all(r["registers"] > 0 and r["max_programs_per_sm"] >= 1 for r in norm_rows)


@pytest.mark.gpu
def test_auto_backend_is_triton_for_dense_and_sparse_decode(monkeypatch):
    import torch

    from sparrow_sgl.attention.kernels import dispatch
    from sparrow_sgl.config import SparsityConfig

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q = torch.zeros(2, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(4, 2, 16, 128, device="cuda", dtype=torch.bfloat16)
    cfg = SparsityConfig(kv_layout="HND")
    if dispatch.installed("triton"):
        assert {dispatch.pick_backend(q, k, cfg, sparse=s) for s in (False, True)} == {"triton"}


def test_env_variant_names_and_settings():
    from bench.decode_e2e import parse_env_variants, with_suffix

    assert parse_env_variants("+w8=SPARROW_DECODE_WAVES=8,+x=A=1;B=2") == {
        "+w8": {"SPARROW_DECODE_WAVES": "8"}, "+x": {"A": "1", "B": "2"}}
    assert with_suffix("sparse-triton@0.80", "+w8") == "sparse-triton+w8@0.80"
    assert base_variant("sparse-triton+w8@0.80") == "sparse-triton+w8" and not is_what_if("sparse-triton+w8")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_resources_list_a_compiled_kernel_that_cannot_load():
    """A kernel a tuning sweep compiled but that does not fit the GPU (call26: a 240 KB shared-memory GEMM tile)
    is listed as not fitting instead of failing the whole profile record."""
    from triton.runtime.errors import OutOfResources

    from bench.kernel_resources import compiled_resources

    class TooBig:
        metadata = SimpleNamespace(num_warps=8, num_stages=2, shared=245760)

        def _init_handles(self):
            raise OutOfResources(245760, 232448, "shared memory")

    jit_fn = SimpleNamespace(__name__="_linear_kernel", device_caches={0: ({"key": TooBig()},)})
    assert compiled_resources(jit_fn) == [{"kernel": "_linear_kernel", "num_warps": 8, "num_stages": 2,
                                           "shared_bytes": 245760, "fits": False}]
