"""CPU checks of the end-to-end decode benchmark: its rollout integration, and that the committed GPU results load
into the measured cost model (`costmodel.MeasuredCost`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bench.decode_e2e import (
    append_rows,
    check_variants,
    interp_extrapolate,
    main,
    rollout_seconds,
    summarize,
    with_width_steps,
)
from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.costmodel import MeasuredCost, load_decode_rows
from sparrow_sgl.schedule import load_preset

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "decode_e2e.json"


def test_interpolation_extends_linearly_and_integrates_per_token():
    x = np.array([0.0, 1.0, 5.0, 12.0])
    assert interp_extrapolate(x, np.array([1.0, 5.0, 10.0]), np.array([2.0, 6.0, 11.0])).tolist() == [1, 2, 6, 13]
    # step time = context / 1000 ms -> sum over 1..N of c/1000 ms
    assert rollout_seconds([1000, 2000], [1.0, 2.0], 100) == pytest.approx(sum(range(1, 101)) / 1e6)


def test_contexts_where_the_step_width_doubles_are_timed_on_both_sides():
    assert with_width_steps([1024, 2048, 4096, 24576, 32768], 32768) == [1024, 1040, 2048, 2064, 4096, 4112, 24576,
                                                                         32768]
    assert with_width_steps([1000, 2048], 2048) == [1000, 2048]  # not a page multiple; nothing past the end


def _rows(batch=4):
    preset = load_preset("qwen3-1.7b-0.86")
    rows = []
    for ctx in (2048, 16384, 32768):
        rows.append({"kind": "decode_step", "model": "qwen3-1.7b", "gpu": "X", "batch": batch, "context": ctx,
                     "budget": None, "step_ms": 1.0 + ctx / 1000, "variant": "dense-fi"})
        rows.append({"kind": "decode_step", "model": "qwen3-1.7b", "gpu": "X", "batch": batch, "context": ctx,
                     "budget": preset.budget_at(ctx), "step_ms": 1.0 + ctx / 4000, "variant": "sparse-fi"})
        rows.append({"kind": "decode_step", "model": "qwen3-1.7b", "gpu": "X", "batch": batch, "context": ctx,
                     "budget": preset.budget_at(ctx), "step_ms": 2.0 + ctx / 4000, "variant": "sparse-triton"})
    return rows, preset


def test_summary_marks_the_best_variants_and_compares_with_the_bytes_limit():
    rows, preset = _rows()
    dense = Schedule.dense(bin_tokens=preset.bin_tokens)
    summary = summarize("qwen3-1.7b", rows, preset, dense, 4, 32768, limit=3.0, base={"model": "qwen3-1.7b"})
    assert {r["variant"] for r in rows if r["kind"] == "decode_step"} == {"dense-fi", "sparse-triton"}  # shipped
    best = next(s for s in summary if s["best"])
    assert best["variant"] == "sparse-triton" and best["rollout_speedup"] > 1
    assert best["ratio_to_bytes_limit"] == pytest.approx(best["rollout_speedup"] / 3.0, abs=1e-3)
    sparse32 = next(r for r in rows if r["variant"] == "sparse-fi" and r["context"] == 32768)
    assert sparse32["speedup"] == pytest.approx((1 + 32.768) / (1 + 8.192), abs=1e-3)
    assert sparse32["bytes_limit_speedup"] > 1


def test_appended_rows_are_read_by_the_measured_cost_model(tmp_path):
    rows, preset = _rows()
    path = tmp_path / "decode_e2e.json"
    append_rows(path, rows[:3])
    append_rows(path, rows[3:] + [{"kind": "decode_rollout", "model": "qwen3-1.7b"}])
    assert len(load_decode_rows(path)) == len(rows)
    cost = MeasuredCost.from_json(path, model="qwen3-1.7b")
    assert cost.speedup(preset, [32768], 4) > 1


def test_committed_gpu_results_load_into_the_measured_cost_model():
    if not RESULTS.is_file():
        pytest.skip("bench/results/decode_e2e.json not committed yet (run python -m bench.decode_e2e on a GPU)")
    rows = load_decode_rows(RESULTS)
    assert rows and all(r.gpu for r in rows)
    raw = json.loads(RESULTS.read_text())
    assert all({"torch", "date", "gpu"} <= set(r) for r in raw)
    for model in sorted({r.model for r in rows}):
        cost = MeasuredCost.from_json(RESULTS, model=model)
        batch = cost.batches[-1]
        speedup = cost.speedup(load_preset(f"{model}-0.86"), [32768], batch)
        assert 1.0 < speedup < 10.0, (model, speedup)


def test_the_measured_cost_model_reads_the_rows_of_the_schedules_scorer():
    """H200 rows of both scorers are committed: "centroid-bf16" steps are faster, so its predicted speedup is larger;
    a scorer with no sparse rows is a clear error naming the measured ones."""
    for model in ("qwen3-1.7b", "qwen3-4b", "qwen3-8b"):
        preset = load_preset(f"{model}-0.86")
        fp32 = MeasuredCost.from_json(RESULTS, model=model, gpu="H200")
        bf16 = MeasuredCost.from_json(RESULTS, model=model, gpu="H200", scorer="centroid-bf16")
        assert {r.scorer for r in bf16.rows if r.budget is not None} == {"centroid-bf16"}
        assert bf16.speedup(preset, [32768], 25) > fp32.speedup(preset, [32768], 25) > 1.0
        with pytest.raises(ConfigError, match="no sparse decode_step rows with scorer 'quest'.*measured"):
            MeasuredCost.from_json(RESULTS, model=model, gpu="H200", scorer="quest")


def test_superseding_keeps_the_other_scorers_rows(tmp_path):
    path = tmp_path / "rows.json"
    row = {"kind": "decode_step", "model": "m", "gpu": "g", "batch": 4, "context": 1024, "step_ms": 1.0}
    old = [row | {"budget": None}, row | {"budget": 512, "scorer": "centroid"},
           row | {"budget": 512, "scorer": "centroid-bf16"}]
    append_rows(path, old)
    append_rows(path, [row | {"budget": 512, "scorer": "centroid-bf16", "step_ms": 0.9}], supersede=True)
    kinds = [r["kind"] for r in json.loads(path.read_text())]
    assert kinds == ["decode_step", "decode_step", "decode_step_superseded", "decode_step"]


@pytest.mark.parametrize("variants, message", [
    ("sparse-triton-bf16c", "need a dense baseline"),
    ("dense-triton,sparse-triton-bf16c+fidense", "what-if variants"),
    ("dense-triton,sparse-tirton", "unknown ['sparse-tirton']"),
])
def test_variant_lists_that_cannot_give_a_speedup_are_refused_before_timing(variants, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["--variants", variants])  # refused before require_cuda: no GPU needed to see the error


def test_usual_variant_lists_pass():
    for variants in ("", "dense-triton", "dense-triton,sparse-triton-bf16c", "dense-fi,sparse-triton,sparse-fi"):
        check_variants(variants)


def test_the_shipped_sparse_variant_stands_for_the_engine_even_when_an_opt_in_is_faster():
    rows, preset = _rows()
    for r in [r for r in rows if r["variant"] == "sparse-triton"]:
        rows.append(r | {"variant": "sparse-triton-bf16c", "step_ms": r["step_ms"] - 0.5})
    dense = Schedule.dense(bin_tokens=preset.bin_tokens)
    summary = summarize("qwen3-1.7b", rows, preset, dense, 4, 32768, limit=3.0, base={"model": "qwen3-1.7b"})
    # the bf16-centroid engine's rows are the cost model's rows for the "centroid-bf16" scorer, not the shipped ones
    assert {r["variant"] for r in rows if r["kind"] == "decode_step"} == {"dense-fi", "sparse-triton",
                                                                          "sparse-triton-bf16c"}
    assert [s["variant"] for s in summary if s["best"]] == ["sparse-triton"]
    by = {s["variant"]: s["rollout_speedup"] for s in summary}
    assert by["sparse-triton-bf16c"] > by["sparse-triton"]  # reported beside it, not as the engine


def test_without_the_shipped_variant_the_fastest_stands_in():
    rows, preset = _rows()
    rows = [r for r in rows if r["variant"] != "sparse-triton"]
    summarize("qwen3-1.7b", rows, preset, Schedule.dense(bin_tokens=preset.bin_tokens), 4, 32768, limit=3.0,
              base={"model": "qwen3-1.7b"})
    assert {r["variant"] for r in rows if r["kind"] == "decode_step"} == {"dense-fi", "sparse-fi"}


def test_bf16_centroid_variants_run_the_centroid_bf16_scorer():
    """The engine scores its bf16 centroid copy only under the "centroid-bf16" scorer: those variants' schedules
    must carry it (and the others keep the preset's)."""
    from bench.decode_e2e import SPARSE_VARIANTS, with_scorer

    preset = load_preset("qwen3-4b-0.86")
    for name, (_, _, bf16c, _) in SPARSE_VARIANTS.items():
        schedule = with_scorer(preset, bf16c)
        assert schedule.scorer == ("centroid-bf16" if "bf16c" in name else "centroid"), name
        assert schedule.budgets == preset.budgets
    assert preset.scorer == "centroid"
