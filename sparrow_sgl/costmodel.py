"""Decode cost of dense vs block-sparse rollouts: the paper's analytic eFLOPs model and measured-timing models.

Analytic (Sparrow §3.3 + App. F), per decode step of a batch, summed over layers:
    compute  = 2 * matmul_params * batch                               linear layers + LM head
             + sum_seq 4 * q_heads * head_dim * attended_tokens        QK^T and PV
             + sum_seq 2 * kv_heads * head_dim * pages                 page scoring (sparse layers, when selecting)
    memory   = weight_bytes                                            weights, read once per step
             + sum_seq kv_dim * attended_tokens * kv_bytes             K and V of the attended pages
             + sum_seq kv_heads * head_dim * pages * summary_bytes     page summaries read by the scorer
    eFLOPs   = compute + I * memory,  I = peak FLOP/s / bandwidth;   seconds = eFLOPs / peak FLOP/s
Dense layers (the schedule's `dense_layers`) always attend the whole context. Integrated over a rollout's length
distribution this reproduces the paper's closed form: 2PN*L_out + rN(2L_in+L_out)L_out*D + I*(... + N*L_out^2*D).

Measured (`MeasuredCost`): whole-model decode-step times written by GPU benchmarks (`bench/results/*.json`): JSON
list, JSON lines, or records {"gpu": ..., "rows": [...]} whose scalar fields every row inherits. Rows read:
    {"kind": "decode_step", "model": "qwen3-4b", "gpu": "H100", "batch": 16, "context": 16384,
     "budget": 1024 | null, "step_ms": 21.3}
`context` is the KV length of every request in the batch, `budget` the KV tokens per (request, KV head), null for
dense. The model interpolates linearly in context (extrapolating from the last two points), linearly between
measured budgets, and takes the measured batch nearest in log scale (per-request share = step time / that batch).
Kernel-measured (`KernelCost`): `bench/attention.py` per-layer attention rows (dense_graph_us, step_graph_us)
interpolated the same way, plus the analytic model's weights and linear layers.

Rollouts are modelled as continuous batching at a steady `batch` of concurrent requests: each decode step of a
request costs its own attention plus 1/batch of the step's weight traffic and linear compute. `drain=True` instead
simulates `batch` slots filled from the queue of requests in order: each step costs every active request its
attention plus 1/active of the shared traffic, so the tail of a rollout, when few long requests are left, is as
weight-bound as it really is (and sparsity helps it less); the measured model takes the nearest measured batch,
so with rows at one batch size only, drain predicts what the steady model does. Prefill is dense and compute-bound
in both cases.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.hardware import Hardware, ModelShape, get_hardware, get_model_shape

DENSE = math.inf  # budget value meaning "attend everything"


def schedule_budgets(schedule: Schedule, contexts: np.ndarray) -> np.ndarray:
    """Budget in tokens (inf for dense) at each KV length, vectorized `schedule.budget_at`."""
    table = np.array([DENSE if b is None else float(b) for b in schedule.budgets])
    bins = np.minimum(np.asarray(contexts).astype(np.int64) // schedule.bin_tokens, len(table) - 1)
    return table[bins]


def _as_budget_array(budget, shape) -> np.ndarray:
    if budget is None:
        return np.full(shape, DENSE)
    arr = np.asarray(budget, dtype=object)
    if arr.dtype == object:
        arr = np.where(arr == None, DENSE, arr).astype(float)  # noqa: E711 (elementwise None test)
    return np.broadcast_to(arr.astype(float), shape)


@dataclass(slots=True)
class StepCost:
    """Cost of one decode step of a whole batch."""

    flops: float  # compute, FLOP
    bytes: float  # memory traffic, bytes
    eflops: float  # compute + I * bytes, FLOP
    seconds: float  # eflops / peak FLOP/s


class CostModel:
    """Common rollout integration; subclasses give the per-token decode time at each KV length."""

    def token_seconds(self, contexts: np.ndarray, budgets: np.ndarray, batch: int, schedule: Schedule) -> np.ndarray:
        raise NotImplementedError

    def prefill_seconds(self, prompt_lens: np.ndarray) -> np.ndarray:
        return np.zeros_like(prompt_lens, dtype=float)

    def predict_rollout_time(
        self,
        schedule: Schedule | None,
        lengths: Sequence[int] | np.ndarray,
        batch: int,
        prompt_len: int | Sequence[int] = 0,
        include_prefill: bool = True,
        drain: bool = False,
    ) -> float:
        """Seconds to generate `lengths` response tokens per request, `batch` requests decoding concurrently
        (drain=True: `batch` slots that empty as requests finish and refill from the rest, in order)."""
        schedule = schedule or Schedule.dense()
        gen, prompt = _lengths(lengths, prompt_len)
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        # The first response token comes from the prefill; decode step k (k >= 1) runs at KV length prompt + k.
        contexts = np.arange(1, int((prompt + gen).max()) + 1)
        budgets = schedule_budgets(schedule, contexts)

        @functools.cache
        def cumulative(active: int) -> np.ndarray:  # per-token seconds at `active` concurrent requests, summed
            return np.concatenate([[0.0], np.cumsum(self.token_seconds(contexts, budgets, active, schedule))])

        if drain:
            decode = _drained_decode_seconds(cumulative, gen, prompt, batch)
        else:
            decode = float(np.sum(cumulative(batch)[prompt + gen - 1] - cumulative(batch)[prompt]))
        prefill = float(np.sum(self.prefill_seconds(prompt))) if include_prefill else 0.0
        return decode + prefill

    def speedup(
        self,
        schedule: Schedule,
        lengths: Sequence[int] | np.ndarray,
        batch: int,
        prompt_len: int | Sequence[int] = 0,
        include_prefill: bool = True,
        drain: bool = False,
    ) -> float:
        """Predicted rollout speedup of `schedule` over dense decode (same lengths, batch, sparsity settings)."""
        dense = _dense_like(schedule)
        t_dense = self.predict_rollout_time(dense, lengths, batch, prompt_len, include_prefill, drain)
        t_sparse = self.predict_rollout_time(schedule, lengths, batch, prompt_len, include_prefill, drain)
        return t_dense / t_sparse


def _drained_decode_seconds(cumulative, gen: np.ndarray, prompt: np.ndarray, slots: int) -> float:
    """Decode seconds of requests that take `slots` slots in order and leave when done; between two departures
    the active set is fixed, so each request's share of that stretch is a difference of the cumulative per-token
    cost at the active count (`cumulative(active)[context]`)."""
    steps = gen - 1  # decode steps per request (the first token comes from the prefill)
    queue = [i for i in range(len(gen)) if steps[i] > 0]
    active: list[int] = []
    left = steps.copy()
    done = prompt.copy()  # KV length before the request's next decode step
    total = 0.0
    while queue or active:
        while queue and len(active) < slots:
            active.append(queue.pop(0))
        run = min(int(left[i]) for i in active)
        table = cumulative(len(active))
        idx = np.array(active)
        total += float(np.sum(table[done[idx] + run] - table[done[idx]]))
        left[idx] -= run
        done[idx] += run
        active = [i for i in active if left[i] > 0]
    return total


def _dense_like(schedule: Schedule) -> Schedule:
    return Schedule.dense(
        page_size=schedule.page_size, bin_tokens=schedule.bin_tokens, dense_layers=list(schedule.dense_layers)
    )


def _lengths(lengths, prompt_len) -> tuple[np.ndarray, np.ndarray]:
    gen = np.atleast_1d(np.asarray(lengths, dtype=np.int64))
    if gen.size == 0:
        raise ConfigError("lengths is empty: give at least one response length")
    if (gen < 1).any():
        raise ConfigError("response lengths must be >= 1 token")
    prompt = np.broadcast_to(np.asarray(prompt_len, dtype=np.int64), gen.shape)
    if (prompt < 0).any():
        raise ConfigError("prompt lengths must be >= 0")
    return gen, prompt


class AnalyticCost(CostModel):
    """The paper's eFLOPs model for a model shape on a hardware preset.

    kv_bytes / weight_bytes: bytes per element (2 for bf16). summary_bytes: bytes per element of a page summary
    (the centroid scorer reads one vector per page and KV head, Quest reads two). bytes_only=True drops compute and
    gives the "bytes limit": time = memory traffic / bandwidth.
    """

    def __init__(
        self,
        model: str | ModelShape,
        hardware: str | Hardware = "h100",
        kv_bytes: int = 2,
        weight_bytes: int = 2,
        summary_bytes: int = 2,
        bytes_only: bool = False,
    ):
        self.model = get_model_shape(model)
        self.hardware = get_hardware(hardware)
        self.kv_bytes, self.weight_bytes, self.summary_bytes = kv_bytes, weight_bytes, summary_bytes
        self.bytes_only = bytes_only

    # -- per request and step ----------------------------------------------------------------------------------
    def _attention_terms(self, contexts: np.ndarray, budgets: np.ndarray, schedule: Schedule):
        """(flops, bytes) of attention + selection for one request at each KV length, summed over layers."""
        m = self.model
        n_dense = sum(1 for i in set(schedule.dense_layers) if i < m.num_layers)
        n_sparse = m.num_layers - n_dense
        ctx = np.asarray(contexts, dtype=float)
        pages = np.ceil(ctx / schedule.page_size)
        attended = np.minimum(budgets, ctx)
        selecting = budgets < pages * schedule.page_size  # selection is skipped when every page fits the budget
        vectors = 2 if schedule.scorer == "quest" else 1
        attn_flops = lambda tokens: 4.0 * m.num_heads * m.head_dim * tokens
        kv_traffic = lambda tokens: float(m.kv_dim * self.kv_bytes) * tokens
        summary_elems = float(vectors * m.num_kv_heads * m.head_dim) * pages
        select_flops = np.where(selecting, 2.0 * summary_elems, 0.0)
        select_bytes = np.where(selecting, self.summary_bytes * summary_elems, 0.0)
        flops = n_dense * attn_flops(ctx) + n_sparse * (attn_flops(attended) + select_flops)
        traffic = n_dense * kv_traffic(ctx) + n_sparse * (kv_traffic(attended) + select_bytes)
        return flops, traffic

    def _to_seconds(self, flops, traffic):
        if self.bytes_only:
            return traffic / self.hardware.bandwidth
        return (flops + self.hardware.flops_per_byte * traffic) / self.hardware.peak_flops

    def token_seconds(self, contexts, budgets, batch, schedule):
        flops, traffic = self._attention_terms(contexts, budgets, schedule)
        return self._to_seconds(flops, traffic) + self.shared_seconds(batch)

    def shared_seconds(self, batch: int) -> float:
        """Per-token share of the linear layers: their compute plus 1/batch of the weight traffic."""
        m = self.model
        return float(self._to_seconds(2.0 * m.matmul_params, float(m.matmul_params * self.weight_bytes) / batch))

    def prefill_seconds(self, prompt_lens):
        m = self.model
        p = np.asarray(prompt_lens, dtype=float)
        flops = 2.0 * m.matmul_params * p + 2.0 * m.num_heads * m.head_dim * p * p * m.num_layers  # causal half
        kv_writes = float(m.kv_dim * self.kv_bytes * m.num_layers) * p
        return self._to_seconds(flops, kv_writes)

    # -- reporting ----------------------------------------------------------------------------------------------
    def step_cost(self, batch: int, context: int, budget: int | None, schedule: Schedule | None = None) -> StepCost:
        """One decode step of `batch` requests that all sit at KV length `context`."""
        schedule = schedule or Schedule.dense()
        ctx = np.array([float(context)])
        flops, traffic = self._attention_terms(ctx, _as_budget_array(budget, ctx.shape), schedule)
        flops = float(flops[0]) * batch + 2.0 * self.model.matmul_params * batch
        traffic = float(traffic[0]) * batch + float(self.model.matmul_params * self.weight_bytes)
        eflops = self.hardware.flops_per_byte * traffic + (0.0 if self.bytes_only else flops)
        return StepCost(flops, traffic, eflops, eflops / self.hardware.peak_flops)


def bytes_limit_speedup(
    model: str | ModelShape,
    schedule: Schedule,
    lengths: Sequence[int] | np.ndarray,
    batch: int,
    prompt_len: int | Sequence[int] = 0,
) -> float:
    """Upper bound on the decode speedup when decode is purely memory-bound: weights + KV + summaries bytes."""
    return AnalyticCost(model, "h100", bytes_only=True).speedup(
        schedule, lengths, batch, prompt_len, include_prefill=False
    )


# -- measured mode ------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class DecodeRow:
    model: str
    batch: int
    context: int
    budget: int | None
    step_ms: float
    gpu: str = ""
    scorer: str = "centroid"  # the page scorer of a sparse row (rows written before session 14: the float32 one)


def load_decode_rows(paths: str | Path | Iterable[str | Path]) -> list[DecodeRow]:
    """Read `decode_step` rows from benchmark JSON files (list, {"rows": [...]}, or JSON lines); others skipped."""
    if isinstance(paths, str | Path):
        paths = [paths]
    rows: list[DecodeRow] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"benchmark file not found: {path}")
        for i, obj in enumerate(_json_objects(path)):
            if obj.get("kind") != "decode_step":
                continue
            try:
                budget = obj.get("budget")
                rows.append(
                    DecodeRow(
                        model=str(obj.get("model", "")),
                        batch=int(obj["batch"]),
                        context=int(obj["context"]),
                        budget=None if budget is None else int(budget),
                        step_ms=float(obj["step_ms"]),
                        gpu=str(obj.get("gpu", "")),
                        scorer=str(obj.get("scorer") or "centroid"),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{path}: row {i} is not a decode_step row (batch, context, step_ms): {e}") from e
    return rows


def _json_objects(path: Path) -> list[dict]:
    """Rows of a JSON / JSON-lines file; a record with "rows" lends its scalar fields (gpu, date) to each row."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is neither JSON nor JSON lines: {e}") from e
    records = data if isinstance(data, list) else [data]
    if not all(isinstance(r, dict) for r in records):
        raise ConfigError(f"{path}: expected JSON objects")
    rows = []
    for record in records:
        if not isinstance(record.get("rows"), list):
            rows.append(record)
            continue
        shared = {k: v for k, v in record.items() if k != "rows" and not isinstance(v, dict | list)}
        rows += [{**shared, **row} for row in record["rows"]]
    return rows


class MeasuredCost(CostModel):
    """Per-step decode time interpolated from benchmark rows of one model (and GPU): dense rows, and the sparse rows
    of one page scorer (a schedule's `scorer`: "centroid-bf16" steps read half the scoring bytes)."""

    def __init__(self, rows: Sequence[DecodeRow], model: str | None = None, gpu: str | None = None,
                 scorer: str = "centroid"):
        if model:
            rows = [r for r in rows if r.model == model]
        if gpu:
            rows = [r for r in rows if gpu.lower() in r.gpu.lower()]
        if not rows:
            raise ConfigError(f"no decode_step rows for model={model!r} gpu={gpu!r}")
        scorers = sorted({r.scorer for r in rows if r.budget is not None})
        if scorers and scorer not in scorers:
            raise ConfigError(f"no sparse decode_step rows with scorer {scorer!r} for model={model!r} gpu={gpu!r}; "
                              f"measured: {scorers}")
        self.rows = [r for r in rows if r.budget is None or r.scorer == scorer]
        self.batches = sorted({r.batch for r in self.rows})

    @classmethod
    def from_json(cls, paths, model: str | None = None, gpu: str | None = None,
                  scorer: str = "centroid") -> MeasuredCost:
        return cls(load_decode_rows(paths), model=model, gpu=gpu, scorer=scorer)

    def nearest_batch(self, batch: int) -> int:
        return min(self.batches, key=lambda b: (abs(math.log(b / batch)), b))

    def _curve(self, batch: int, budget: float) -> tuple[np.ndarray, np.ndarray]:
        """(contexts, step seconds) measured at this batch and budget, averaged over repeats."""
        key = None if budget == DENSE else int(budget)
        points: dict[int, list[float]] = {}
        for r in self.rows:
            if r.batch == batch and r.budget == key:
                points.setdefault(r.context, []).append(r.step_ms / 1e3)
        ctx = np.array(sorted(points), dtype=float)
        return ctx, np.array([np.mean(points[int(c)]) for c in ctx])

    def step_seconds(self, batch: int, contexts, budget: int | float | None) -> np.ndarray:
        """Per-step time of a batch at each KV length (nearest measured batch; interpolated budget)."""
        b = self.nearest_batch(batch)
        budget = DENSE if budget is None else float(budget)
        ctx = np.atleast_1d(np.asarray(contexts, dtype=float))
        measured = sorted({DENSE if r.budget is None else float(r.budget) for r in self.rows if r.batch == b})
        if budget in measured:
            return _interp_linear(ctx, *self._curve(b, budget))
        finite = [x for x in measured if x != DENSE]
        if not finite:
            raise ConfigError(f"no sparse decode_step rows at batch {b} to estimate budget {int(budget)}")
        lo = max([x for x in finite if x < budget], default=finite[0])
        hi = min([x for x in finite if x > budget], default=finite[-1])
        y_lo, y_hi = _interp_linear(ctx, *self._curve(b, lo)), _interp_linear(ctx, *self._curve(b, hi))
        if lo == hi:
            return y_lo
        w = (budget - lo) / (hi - lo)
        return (1 - w) * y_lo + w * y_hi

    def token_seconds(self, contexts, budgets, batch, schedule):
        """Per-request share of a step: step time / batch, both at the nearest measured batch."""
        measured_batch = self.nearest_batch(batch)
        out = np.empty(len(contexts), dtype=float)
        for budget in np.unique(budgets):
            where = budgets == budget
            out[where] = self.step_seconds(measured_batch, contexts[where], budget) / measured_batch
        return out


def load_attention_rows(paths, sparse_field: str = "step_graph_us", dense_field: str = "dense_graph_us"):
    """Per-layer attention kernel timings of `bench/attention.py` records as rows (step_ms = one layer's step).

    Sparse rows take `sparse_field` (summary update + selection + sparse decode), dense rows `dense_field`.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    rows = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"benchmark file not found: {path}")
        for obj in _json_objects(path):
            if obj.get("bench") != "attention":
                continue
            field = dense_field if obj.get("budget") is None else sparse_field
            if obj.get(field) is None:
                continue
            budget = None if obj.get("budget") is None else int(obj["budget"])
            step_ms = float(obj[field]) / 1e3
            rows.append(DecodeRow(str(obj["model"]), int(obj["batch"]), int(obj["context"]), budget, step_ms,
                                  str(obj.get("gpu", ""))))  # fmt: skip
    if not rows:
        raise ConfigError(f"no attention benchmark rows (bench == 'attention') in {[str(p) for p in paths]}")
    return rows


class KernelCost(CostModel):
    """Measured per-layer attention kernels (dense and sparse step) + the analytic model's linear layers.

    Per token: weights/linear share (analytic, on `hardware`) + dense layers x measured dense attention +
    sparse layers x measured sparse step (or dense attention while the budget covers the whole context), each
    per-request share taken at the nearest measured batch.
    """

    def __init__(self, model: str | ModelShape, rows: Sequence[DecodeRow], hardware="h100", gpu: str | None = None):
        self.analytic = AnalyticCost(model, hardware)
        self.kernels = MeasuredCost(rows, model=self.analytic.model.name, gpu=gpu)

    @classmethod
    def from_json(cls, model, paths, hardware="h100", gpu: str | None = None) -> KernelCost:
        return cls(model, load_attention_rows(paths), hardware, gpu)

    def token_seconds(self, contexts, budgets, batch, schedule):
        m = self.analytic.model
        n_dense = sum(1 for i in set(schedule.dense_layers) if i < m.num_layers)
        dense = self.kernels.token_seconds(contexts, np.full(len(contexts), DENSE), batch, schedule)
        sparse = self.kernels.token_seconds(contexts, budgets, batch, schedule)
        sparse = np.where(budgets >= contexts, dense, sparse)
        return self.analytic.shared_seconds(batch) + n_dense * dense + (m.num_layers - n_dense) * sparse

    def prefill_seconds(self, prompt_lens):
        return self.analytic.prefill_seconds(prompt_lens)


def _interp_linear(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Linear interpolation that extrapolates linearly beyond both ends (decode time is affine in context)."""
    if xp.size == 0:
        raise ConfigError("no measured points for this batch and budget")
    if xp.size == 1:
        return np.full_like(x, fp[0])
    y = np.interp(x, xp, fp)
    left, right = x < xp[0], x > xp[-1]
    y[left] = fp[0] + (x[left] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    y[right] = fp[-1] + (x[right] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return np.maximum(y, 0.0)


def make_cost_model(
    model: str | ModelShape | None = None,
    hardware: str | Hardware = "h100",
    measured: str | Path | Sequence[str | Path] | None = None,
    gpu: str | None = None,
    kernels: str | Path | Sequence[str | Path] | None = None,
    summary_bytes: int = 2,
    scorer: str = "centroid",
) -> CostModel:
    """Measured decode steps (the sparse ones of `scorer`), else measured attention kernels + analytic linear layers,
    else purely analytic."""
    if kernels:
        if model is None:
            raise ConfigError("the kernel-measured cost model needs a model shape: a Qwen3 name or a model dir")
        return KernelCost.from_json(model, kernels, hardware, gpu)
    if measured:
        name = model if isinstance(model, str) else (model.name if model else None)
        return MeasuredCost.from_json(measured, model=name, gpu=gpu, scorer=scorer)
    if model is None:
        raise ConfigError("the analytic cost model needs a model: a Qwen3 shape name or a model dir")
    return AnalyticCost(model, hardware, summary_bytes=summary_bytes)


def predict_rollout_time(
    schedule: Schedule | None,
    lengths: Sequence[int] | np.ndarray,
    batch: int,
    *,
    model: str | ModelShape | None = None,
    hardware: str | Hardware = "h100",
    prompt_len: int | Sequence[int] = 0,
    cost: CostModel | None = None,
    drain: bool = False,
) -> float:
    """Seconds of decode (+ prefill) for a length distribution; the model defaults to `schedule.model`."""
    cost = cost or make_cost_model(model or (schedule.model if schedule else None) or None, hardware)
    return cost.predict_rollout_time(schedule, lengths, batch, prompt_len, drain=drain)


def speedup(
    schedule: Schedule,
    lengths: Sequence[int] | np.ndarray = (32768,),
    batch: int = 16,
    *,
    model: str | ModelShape | None = None,
    hardware: str | Hardware = "h100",
    prompt_len: int | Sequence[int] = 0,
    cost: CostModel | None = None,
    drain: bool = False,
) -> float:
    """Predicted rollout speedup of `schedule` over dense; the model defaults to `schedule.model`."""
    cost = cost or make_cost_model(model or schedule.model or None, hardware)
    return cost.speedup(schedule, lengths, batch, prompt_len, drain=drain)
