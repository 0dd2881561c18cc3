"""Drained rollouts from measured decode steps (`python -m bench.decode_e2e --drain`).

The growing-together rollout (every request 1 -> 32K at once) is the bytes limit's best case. In a real rollout the
responses end at different lengths: `batch` slots refill from a queue in order, and at the end few long requests
are left, each step weight-bound. This mode also times the best dense and sparse variants at smaller batches,
models a step at any active count and context by linear interpolation in context and then in batch
(`StepCurves`), and runs the cost model's drain simulation (`CostModel.predict_rollout_time(drain=True)`) on it for
response lengths uniform in [1K, 32K]. Beside it, the analytic cost model's prediction of the same rollout (eFLOPs,
H200 preset) and its bytes limit, so each row carries the measured speedup's ratio to the prediction.
"""

from __future__ import annotations

import numpy as np

from bench.decode_e2e import UNFUSED, interp_extrapolate
from sparrow_sgl.costmodel import AnalyticCost, CostModel


def drain_batches(batch: int, count: int) -> list[int]:
    """Smaller batches to time, spaced geometrically from `batch` down to 1 (the full batch itself excluded)."""
    sizes = {max(1, round(b)) for b in np.geomspace(batch, 1, count + 1)}
    return sorted((b for b in sizes if b < batch), reverse=True)


def drain_lengths(requests: int, lo: int, hi: int, seed: int = 0) -> np.ndarray:
    """Response lengths uniform in [lo, hi] tokens (the order the queue serves them in)."""
    return np.random.default_rng(seed).integers(lo, hi + 1, size=requests)


class StepCurves(CostModel):
    """Measured step times of one dense and one sparse variant at several batches -> per-token seconds."""

    def __init__(self, rows: list[dict]) -> None:
        points: dict[tuple[bool, int], dict[int, float]] = {}
        for r in rows:
            points.setdefault((r["budget"] is not None, int(r["batch"])), {})[int(r["context"])] = r["step_ms"]
        self.curves = {k: (np.array(sorted(v), float), np.array([v[c] for c in sorted(v)], float))
                       for k, v in points.items()}

    def step_ms(self, sparse: bool, active: int, contexts: np.ndarray) -> np.ndarray:
        """Step ms at each context for `active` requests: linear in context, then linear in batch."""
        batches = sorted(b for s, b in self.curves if s == sparse)
        if not batches:
            raise ValueError(f"no {'sparse' if sparse else 'dense'} rows to model")
        at = np.stack([interp_extrapolate(np.asarray(contexts, float), *self.curves[(sparse, b)]) for b in batches])
        if len(batches) == 1:
            return at[0]
        i = int(np.clip(np.searchsorted(batches, active) - 1, 0, len(batches) - 2))
        w = (active - batches[i]) / (batches[i + 1] - batches[i])
        return np.maximum((1 - w) * at[i] + w * at[i + 1], 0.0)

    def token_seconds(self, contexts, budgets, batch, schedule):
        return self.step_ms(not schedule.is_dense, batch, contexts) / 1e3 / batch


def drain_summary(name: str, rows: list[dict], presets, dense, batch: int, args, base: dict) -> list[dict]:
    """One `decode_drain` row per preset: measured vs predicted speedup, drained and growing together."""
    from bench.common import parse_ints

    lo, hi = parse_ints(args.drain_lengths)
    requests = args.drain_requests or 4 * batch
    lengths = drain_lengths(requests, lo, hi)
    together = [args.max_context] * batch
    steps = [r for r in rows if r.get("kind") == "decode_step" and not r["variant"].endswith(UNFUSED)]
    dense_rows = [r for r in steps if r["budget"] is None]
    predicted = AnalyticCost(name, "h200")
    limit = AnalyticCost(name, "h200", bytes_only=True)
    out = []
    for p in presets:
        # the preset's own scorer: the engine's rows under another scorer ("centroid-bf16") share the schedule name
        sparse_rows = [r for r in steps if r["schedule"] == p.name and r.get("scorer", p.scorer) == p.scorer]
        if not sparse_rows or not dense_rows:
            continue
        curves = StepCurves(dense_rows + sparse_rows)
        kw = dict(include_prefill=False)
        t_dense = curves.predict_rollout_time(dense, lengths, batch, drain=True, **kw)
        t_sparse = curves.predict_rollout_time(p, lengths, batch, drain=True, **kw)
        row = base | {
            "kind": "decode_drain", "schedule": p.name, "dense_variant": dense_rows[0]["variant"],
            "sparse_variant": sparse_rows[0]["variant"], "requests": requests, "lengths": f"uniform {lo}-{hi}",
            "seed": 0, "slots": batch, "measured_batches": sorted({int(r["batch"]) for r in sparse_rows}),
            "rollout_dense_s": round(t_dense, 3), "rollout_sparse_s": round(t_sparse, 3),
            "speedup_drain": round(t_dense / t_sparse, 3),
            "speedup_together": round(curves.speedup(p, together, batch, **kw), 3),
            "predicted_drain": round(predicted.speedup(p, lengths, batch, drain=True, **kw), 3),
            "predicted_together": round(predicted.speedup(p, together, batch, **kw), 3),
            "bytes_limit_drain": round(limit.speedup(p, lengths, batch, drain=True, **kw), 3),
            "bytes_limit_together": round(limit.speedup(p, together, batch, **kw), 3),
            "note": "measured = step times interpolated in context and batch, run through the cost model's drain "
                    "simulation; predicted = AnalyticCost(h200) eFLOPs model",
        }
        for mode in ("drain", "together"):
            row[f"ratio_to_predicted_{mode}"] = round(row[f"speedup_{mode}"] / row[f"predicted_{mode}"], 3)
            row[f"ratio_to_bytes_limit_{mode}"] = round(row[f"speedup_{mode}"] / row[f"bytes_limit_{mode}"], 3)
        out.append(row)
    return out


def print_drain(rows: list[dict]) -> None:
    print("\nrollout speedup, growing together vs drained (lengths uniform, slots refilled in order): "
          "measured / predicted (AnalyticCost h200) / bytes limit")
    print(f"{'model':11} {'schedule':18} {'together':>8} {'pred':>6} {'limit':>6} {'drain':>6} {'pred':>6} "
          f"{'limit':>6} {'drain/pred':>10}")
    for r in rows:
        if r.get("kind") == "decode_drain":
            print(f"{r['model']:11} {r['schedule']:18} {r['speedup_together']:>7}x {r['predicted_together']:>6} "
                  f"{r['bytes_limit_together']:>6} {r['speedup_drain']:>5}x {r['predicted_drain']:>6} "
                  f"{r['bytes_limit_drain']:>6} {r['ratio_to_predicted_drain']:>10}")
