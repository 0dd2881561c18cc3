"""`sparrow plan`: the cheapest schedule whose every position bin keeps its acceptance-rate tail >= tau + margin.

Per bin, the cheapest budget is the smallest measured one that passes (decode cost grows with the budget under
any cost model). Budgets are then made non-decreasing with position by a running maximum, which is the cheapest
monotone schedule above the per-bin minima. A bin without enough measured tokens borrows the larger of its
neighbours' choices (the tail falls with position, so the later neighbour is the safe one) and is flagged; a bin
that no budget satisfies is dense, and so is every later bin (monotonicity), all reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparrow_sgl.calibrate import CalibrationTable
from sparrow_sgl.config import ConfigError, Schedule

OK, RAISED, MISSING, UNSATISFIABLE = "ok", "raised", "missing", "unsatisfiable"
_DENSE = float("inf")


@dataclass(slots=True)
class BinDecision:
    bin: int
    start: int
    end: int
    budget: int | None  # tokens; None = dense
    tail: float | None  # measured tail of the chosen budget in this bin (None if unmeasured)
    count: int  # tokens behind that tail
    status: str  # ok | raised (monotonicity) | missing (no data, borrowed) | unsatisfiable (dense)


@dataclass(slots=True)
class Plan:
    schedule: Schedule
    bins: list[BinDecision]
    threshold: float  # tau + margin
    warnings: list[str] = field(default_factory=list)

    def flagged(self, status: str) -> list[int]:
        return [d.bin for d in self.bins if d.status == status]

    def report(self) -> str:
        lines = [f"planned {self.schedule.describe()}", f"threshold: tail >= {self.threshold:.4f}"]
        flags = ((MISSING, "no data (borrowed a neighbour's budget)"), (UNSATISFIABLE, "dense: no budget passes"))
        for status, what in flags:
            spans = [f"{d.start}-{d.end}" for d in self.bins if d.status == status]
            if spans:
                lines.append(f"positions {', '.join(spans)} (tokens): {what}")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def plan_schedule(
    table: CalibrationTable,
    tau: float = 0.86,
    margin: float = 0.0,
    min_count: int = 20,
    num_bins: int | None = None,
    name: str = "",
) -> Plan:
    """Choose per-bin budgets from a calibration table (see module doc)."""
    grid = table.budget_values()
    if not grid:
        raise ConfigError("calibration table has no sparse budgets to choose from")
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, got {min_count}")
    threshold = tau + margin
    n = num_bins or table.num_bins
    cheapest = [_cheapest(table, grid, i, threshold, min_count) for i in range(n)]
    measured = [any(table.tail(b, i, min_count) is not None for b in grid) for i in range(n)]
    if not any(measured):
        raise ConfigError(f"no bin of the calibration table has >= {min_count} tokens; lower --min-count")
    filled = _fill_missing(cheapest, measured)
    budgets = list(np.maximum.accumulate(filled))
    decisions = []
    for i, b in enumerate(budgets):
        budget = None if b == _DENSE else int(b)
        if not measured[i]:
            status = MISSING
        elif cheapest[i] == _DENSE:
            status = UNSATISFIABLE
        else:
            status = OK if b == cheapest[i] else RAISED
        stats = table.stats(budget) if budget is None or table.has(budget) else []
        stat = stats[i] if i < len(stats) else None
        tail = stat.tail if stat is not None and stat.count >= min_count else None
        start = i * table.bin_tokens
        count = stat.count if stat else 0
        decisions.append(BinDecision(i, start, start + table.bin_tokens, budget, tail, count, status))
    schedule = Schedule(
        budgets=[d.budget for d in decisions],
        bin_tokens=table.bin_tokens,
        tau=tau,
        quantile=table.quantile,
        model=table.model,
        name=name or f"planned-{Path(table.model).name or 'model'}-{tau:g}",
        **_sparsity_settings(table.settings),
    )
    return Plan(schedule, decisions, threshold, _warnings(table, decisions, threshold, min_count))


def _cheapest(table: CalibrationTable, grid: list[int], i: int, threshold: float, min_count: int) -> float:
    for budget in grid:
        tail = table.tail(budget, i, min_count)
        if tail is not None and tail >= threshold:
            return float(budget)
    return _DENSE


def _fill_missing(cheapest: list[float], measured: list[bool]) -> list[float]:
    """Unmeasured bins take the larger of the nearest measured neighbours' budgets."""
    out = list(cheapest)
    idx = [i for i, m in enumerate(measured) if m]
    for i, m in enumerate(measured):
        if m:
            continue
        before = [cheapest[j] for j in idx if j < i][-1:]
        after = [cheapest[j] for j in idx if j > i][:1]
        out[i] = max(before + after)
    return out


def _sparsity_settings(settings: dict) -> dict:
    keys = ("page_size", "sink_pages", "local_pages", "scorer", "dense_layers")
    return {k: (list(settings[k]) if k == "dense_layers" else settings[k]) for k in keys if k in settings}


def _warnings(table, decisions, threshold, min_count) -> list[str]:
    out = []
    if table.mode == "topk":
        out.append("table measured in top-k mode: tails are lower bounds, so the plan errs on the dense side")
    for d in decisions:
        floor = table.tail(None, d.bin, min_count)
        if floor is not None and floor < threshold:
            out.append(f"bin {d.bin}: the dense engine's own tail ({floor:.4f}) is below the threshold (noise floor)")
    return out


# -- length distributions -----------------------------------------------------------------------------------------
def parse_lengths(spec: str) -> np.ndarray:
    """`32768`, `4096,8192,16384`, `uniform:1024:32768[:n]`, or a .json list / .jsonl of rollouts or lengths."""
    spec = str(spec).strip()
    path = Path(spec)
    if path.suffix in (".json", ".jsonl"):
        return _lengths_from_file(path)
    try:
        if spec.startswith("uniform:"):
            parts = [int(x) for x in spec.split(":")[1:]]
            lo, hi, n = (*parts, 64) if len(parts) == 2 else parts
            return np.linspace(lo, hi, n).round().astype(np.int64)
        values = np.array([int(x) for x in spec.split(",") if x.strip()], dtype=np.int64)
    except ValueError as e:
        raise ConfigError(f"bad --lengths {spec!r}: use N, N1,N2,..., uniform:LO:HI[:COUNT] or a file ({e})") from e
    if values.size == 0 or (values < 1).any():
        raise ConfigError(f"bad --lengths {spec!r}: need positive token counts")
    return values


def _lengths_from_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(f"lengths file not found: {path}")
    text = path.read_text()
    items = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    out = []
    for item in items:
        if isinstance(item, int):
            out.append(item)
        elif isinstance(item, dict) and "token_ids" in item:
            out.append(len(item["token_ids"]))
        elif isinstance(item, dict) and "length" in item:
            out.append(int(item["length"]))
        else:
            raise ConfigError(f"{path}: entries must be ints or objects with 'token_ids' or 'length'")
    return parse_lengths(",".join(map(str, out)))


# -- explanation --------------------------------------------------------------------------------------------------
def explain_schedule(schedule: Schedule, cost, batch: int, plan: Plan | None = None) -> str:
    """Per bin: budget, share of the KV it reads at the bin's middle, tail (if planned), step time dense vs sparse."""
    from sparrow_sgl.costmodel import schedule_budgets

    names = ("bin (tokens)", "budget", "KV read", "tail", "dense ms", "sparse ms", "step")
    rows = [
        f"per bin: KV read = budget / context at the bin's middle; ms = one decode step of all {batch} requests there",
        " ".join(f"{n:>{w}}" for n, w in zip(names, (15, 14, 8, 7, 9, 9, 6))),
    ]
    for i, budget in enumerate(schedule.budgets):
        start = i * schedule.bin_tokens
        mid = start + schedule.bin_tokens // 2
        ctx = np.array([mid])
        dense = batch * 1e3 * cost.token_seconds(ctx, np.array([_DENSE]), batch, schedule)[0]
        sparse = batch * 1e3 * cost.token_seconds(ctx, schedule_budgets(schedule, ctx), batch, schedule)[0]
        label = "dense" if budget is None else f"{budget} ({budget // schedule.page_size}p)"
        read = 1.0 if budget is None else min(1.0, budget / mid)
        tail = "" if plan is None or plan.bins[i].tail is None else f"{plan.bins[i].tail:.4f}"
        flag = "" if plan is None or plan.bins[i].status == OK else f"  [{plan.bins[i].status}]"
        span = f"{start}-{start + schedule.bin_tokens}"
        rows.append(
            f"{span:>15} {label:>14} {read:>7.1%} {tail:>7} {dense:>9.4g} {sparse:>9.4g} {dense / sparse:>5.2f}x{flag}"
        )
    return "\n".join(rows)


# -- CLI ----------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", nargs="?", help="calibration table JSON written by `sparrow calibrate`")
    p.add_argument("--tau", type=float, default=0.86, help="tail threshold (default 0.86)")
    p.add_argument("--margin", type=float, default=0.0, help="safety margin added to tau (default 0)")
    p.add_argument("--min-count", type=int, default=20, help="tokens a bin needs to count as measured (default 20)")
    p.add_argument("--bins", type=int, default=None, help="number of bins of the schedule (default: the table's)")
    p.add_argument("--out", "-o", help="schedule JSON to write (default: <table dir>/schedule-tau<tau>.json)")
    p.add_argument("--preset", help="explain an existing schedule instead: a preset name, fixed:N or a JSON file")
    p.add_argument("--explain", action="store_true", help="print the per-bin budgets, tails and step costs")
    p.add_argument("--model", help="cost-model shape: qwen3-1.7b|4b|8b|14b or a model dir (default: table/preset)")
    p.add_argument("--hardware", default="h100", help="hardware preset for the analytic model (h100|h200|a100|cpu)")
    p.add_argument("--measured", nargs="+", help="benchmark JSON with decode_step rows: use measured step times")
    p.add_argument("--kernels", nargs="+", help="bench/attention.py JSON: measured attention + analytic linear layers")
    p.add_argument("--gpu", help="with --measured/--kernels, keep rows whose gpu field contains this")
    p.add_argument("--summary-bytes", type=int, default=2, help="bytes per page-summary element (2 bf16, 4 fp32)")
    p.add_argument("--batch", type=int, default=16, help="concurrent requests while decoding (default 16)")
    p.add_argument("--lengths", default="uniform:1024:32768", help="response lengths: N | N1,N2 | uniform:LO:HI | file")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per request (default 256)")
    p.add_argument("--drain", action="store_true",
                   help="model --batch slots that empty as requests finish and refill in order (default: steady batch)")


def run(args: argparse.Namespace) -> int:
    if not args.table and not args.preset:
        raise ConfigError("give a calibration table to plan from, or --preset NAME to explain a schedule")
    lengths = _check_cost_args(args)
    plan = None
    if args.table:
        table = CalibrationTable.load(args.table)
        table.model = table.model_path(args.table)  # a relative entry is found from any working directory
        plan = plan_schedule(table, args.tau, args.margin, args.min_count, args.bins)
        schedule = plan.schedule
    else:
        from sparrow_sgl.schedule import resolve_schedule

        schedule = resolve_schedule(args.preset)
    cost = _cost_model(schedule, args)  # before anything is written: a bad --model / --measured fails the run
    if plan is not None:
        out = Path(args.out or Path(args.table).with_name(f"schedule-tau{args.tau:g}.json"))
        plan.schedule.save(out)
        print(plan.report())
        print(f"wrote {out}")
    else:
        print(schedule.describe())
    if cost is not None:
        _print_cost(schedule, cost, lengths, args, plan)
    return 0


def _check_cost_args(args) -> np.ndarray:
    """The cost flags are checked before any planning or writing; returns the response lengths."""
    from sparrow_sgl.hardware import get_hardware

    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.prompt_len < 0:
        raise ConfigError(f"--prompt-len must be >= 0, got {args.prompt_len}")
    get_hardware(args.hardware)
    return parse_lengths(args.lengths)


def _cost_model(schedule: Schedule, args):
    """The cost model, or None (said on stderr) when the schedule names no usable model and no flag asked for one."""
    from sparrow_sgl.costmodel import make_cost_model

    model = args.model or schedule.model or None
    try:
        return make_cost_model(model, args.hardware, args.measured, args.gpu, args.kernels, args.summary_bytes,
                               scorer=schedule.scorer)
    except ConfigError as e:
        if args.model or args.measured or args.kernels:
            raise
        print(f"no speedup prediction: {e}", file=sys.stderr)
        return None


def _print_cost(schedule: Schedule, cost, lengths: np.ndarray, args, plan: Plan | None) -> None:
    from sparrow_sgl.costmodel import AnalyticCost

    model = args.model or schedule.model or None
    source = f"analytic eFLOPs on {args.hardware}"
    if args.kernels:
        source = f"measured attention kernels + analytic linear layers on {args.hardware}"
    elif args.measured:
        source = "measured decode steps"
    if args.explain:
        print(explain_schedule(schedule, cost, args.batch, plan))
    up = cost.speedup(schedule, lengths, args.batch, args.prompt_len, drain=args.drain)
    span = f"{lengths.min()}" if lengths.min() == lengths.max() else f"{lengths.min()}-{lengths.max()}"
    batching = f"{'draining' if args.drain else 'steady'} batch {args.batch}"
    print(
        f"predicted rollout speedup vs dense: {up:.2f}x ({source}, {batching}, prompt {args.prompt_len} "
        f"tokens, {lengths.size} responses of {span} tokens, mean {lengths.mean():.0f} tokens)"
    )
    if model and not args.measured:
        limit = AnalyticCost(model, args.hardware, summary_bytes=args.summary_bytes, bytes_only=True).speedup(
            schedule, [int(lengths.max())], args.batch, args.prompt_len, include_prefill=False
        )
        print(f"bytes limit (weights + KV + summaries) growing to {lengths.max()} tokens: {limit:.2f}x")
