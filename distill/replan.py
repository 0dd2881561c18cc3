"""Re-planning with DistillSparse: once φ has pulled the sparse policy toward the dense one, a cheaper schedule may
hold the tail threshold — find it, switch to it, and switch back if it stops holding.

Every `replan_every` steps the `Replanner` re-measures per-bin acceptance-rate tails on held-out prompts with
`sparrow_sgl.calibrate.measure_budget`, at the current schedule and at progressively cheaper ones (every sparse
budget scaled by `factor`, `factor`², ...). The measured mismatch is the one training cares about: the rollout
policy (sparse θ + φ, as the engine serves it) against the dense policy θ *without* φ — the engine view below
switches the adapter off for the dense side only. It switches to the cheapest candidate whose lowest tail is
>= tau + margin and logs old/new schedule with the cost model's predicted speedups.

Switching back: a re-measure of the current schedule below tau reverts to the schedule it replaced; between
re-measures a `TailGuard` on the new schedule watches the live tails (fed by `observe`) and raises budgets as soon
as a bin falls below tau.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sparrow_sgl.config import Schedule
from sparrow_sgl.mismatch import BinStat

log = logging.getLogger(__name__)


@dataclass
class ReplanEvent:
    step: int
    action: str  # "switch" | "revert" | "hold" | "guard"
    old: str  # Schedule.describe()
    new: str
    old_budgets: list
    new_budgets: list
    tails: dict[str, float | None] = field(default_factory=dict)  # schedule name -> lowest measured bin tail
    threshold: float = 0.0
    speedup_old: float | None = None  # predicted rollout speedup over dense (cost model)
    speedup_new: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        def fmt(x):
            return "n/a" if x is None else f"{x:.2f}x"

        tails = ", ".join(f"{k}: {'n/a' if v is None else f'{v:.4f}'}" for k, v in self.tails.items())
        return (
            f"replan step {self.step}: {self.action} {self.old} -> {self.new}; predicted speedup "
            f"{fmt(self.speedup_old)} -> {fmt(self.speedup_new)}; lowest tails ({tails}) vs {self.threshold:.4f}"
        )


def cheaper_schedule(schedule: Schedule, factor: float, name: str = "") -> Schedule | None:
    """Every sparse budget scaled by `factor`, floored to a page multiple and the sink+local minimum.

    Dense bins stay dense (making a bin sparse is the planner's call). None when nothing changes.
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must lie in (0, 1), got {factor}")
    floor, page = schedule.sparsity().min_budget, schedule.page_size
    budgets = [None if b is None else max(floor, int(b * factor) // page * page) for b in schedule.budgets]
    if budgets == schedule.budgets:
        return None
    return dataclasses.replace(schedule, budgets=budgets, name=name or f"{schedule.name or 'schedule'}x{factor:g}")


class TrainedDenseView:
    """The engine as `calibrate.measure_budget` sees it: samples and sparse scores with the adapter (the rollout
    policy), dense scores with the adapter switched off (the trained dense policy θ)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.tokenizer = getattr(engine, "tokenizer", None)

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def score(self, prompt_ids, response_ids, sparse=None, **kwargs):
        adapter = self.engine.adapter_path
        if sparse is not None or adapter is None:
            return self.engine.score(prompt_ids, response_ids, sparse=sparse, **kwargs)
        self.engine.set_adapter(None)
        try:
            return self.engine.score(prompt_ids, response_ids, sparse=None, **kwargs)
        finally:
            self.engine.set_adapter(adapter)


@dataclass
class ReplanSettings:
    tau: float = 0.86
    margin: float = 0.0
    bin_tokens: int = 2048
    quantile: float = 0.05
    max_new_tokens: int = 256
    samples: int = 2  # responses per held-out prompt
    candidates: int = 2  # cheaper schedules tried per re-plan
    factor: float = 0.75  # budget scale between candidates
    min_count: int = 20  # tokens a bin needs for its tail to count
    ignore_eos: bool = False
    seed: int = 0
    batch: int = 16  # concurrent requests assumed by the cost model
    model: str = ""  # cost model shape: a Qwen3 shape name or a model dir ("" = the schedule's model)
    hardware: str = "h100"


class Replanner:
    def __init__(self, engine, prompts: list[list[int]], settings: ReplanSettings, log_path: str | None = None):
        if not prompts:
            raise ValueError("the re-planner needs at least one held-out prompt")
        self.view = TrainedDenseView(engine)
        self.prompts = prompts
        self.settings = settings
        self.log_path = Path(log_path) if log_path else None
        self.history: list[Schedule] = []  # schedules replaced by a switch (most recent last)
        self.guard = None
        self.events: list[ReplanEvent] = []
        self._lengths: list[int] = []

    # -- checkpoint state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"history": [s.to_dict() for s in self.history], "events": [e.to_dict() for e in self.events]}
        if self.guard is not None:
            state["guard"] = {"schedule": self.guard.schedule.to_dict(), "state": self.guard.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        from sparrow_sgl.tailguard import TailGuard

        self.history = [Schedule.from_dict(s, where="re-planner checkpoint state") for s in state["history"]]
        self.events = [ReplanEvent(**e) for e in state["events"]]
        self.guard = None
        if "guard" in state:
            schedule = Schedule.from_dict(state["guard"]["schedule"], where="re-planner checkpoint state")
            guard_state = state["guard"]["state"]
            self.guard = TailGuard(schedule, tau=guard_state["tau"], grid=guard_state["grid"],
                                   min_count=self.settings.min_count)
            self.guard.load_state_dict(guard_state)

    # -- measurement --------------------------------------------------------------------------------------------
    def measure(self, schedule: Schedule) -> list[BinStat]:
        from sparrow_sgl.calibrate import measure_budget

        s = self.settings
        longest = max(len(p) for p in self.prompts) + s.max_new_tokens
        stats = measure_budget(
            _LengthRecorder(self.view, self._lengths), self.prompts, schedule, samples=s.samples,
            max_new_tokens=s.max_new_tokens, seed=s.seed, bin_tokens=s.bin_tokens, quantile=s.quantile,
            num_bins=-(-longest // s.bin_tokens), mode="full", topk=0, ignore_eos=s.ignore_eos, progress=False,
        )
        return stats

    def lowest_tail(self, stats: list[BinStat]) -> float | None:
        tails = [b.tail for b in stats if b.tail is not None and b.count >= self.settings.min_count]
        return min(tails) if tails else None

    def predicted_speedup(self, schedule: Schedule) -> float | None:
        from sparrow_sgl.config import ConfigError
        from sparrow_sgl.costmodel import speedup

        s = self.settings
        lengths = self._lengths or [s.max_new_tokens]
        prompt_len = int(sum(len(p) for p in self.prompts) / len(self.prompts))
        try:
            return float(speedup(schedule, lengths, s.batch, model=s.model or schedule.model or None,
                                 hardware=s.hardware, prompt_len=prompt_len))
        except (ConfigError, ValueError, KeyError) as e:
            log.info("no speedup prediction for %s: %s", schedule.describe(), e)
            return None

    # -- decisions ----------------------------------------------------------------------------------------------
    def replan(self, step: int, schedule: Schedule) -> tuple[Schedule | None, ReplanEvent]:
        """Re-measure; returns (the schedule to switch to or None, the event that says why)."""
        threshold = self.settings.tau + self.settings.margin
        self._lengths.clear()
        current_tail = self.lowest_tail(self.measure(schedule))
        tails = {schedule.name or "current": current_tail}
        if current_tail is not None and current_tail < self.settings.tau and self.history:
            return self._decide(step, "revert", schedule, self.history.pop(), tails)
        candidates, cursor = [], schedule
        for i in range(self.settings.candidates):
            name = f"{schedule.name or 'schedule'}-r{step}.{i + 1}"
            cursor = cheaper_schedule(cursor, self.settings.factor, name=name)
            if cursor is None:
                break
            candidates.append(cursor)
        for candidate in reversed(candidates):  # cheapest first: stop at the first that holds
            tail = self.lowest_tail(self.measure(candidate))
            tails[candidate.name] = tail
            if tail is not None and tail >= threshold:
                self.history.append(schedule)
                return self._decide(step, "switch", schedule, candidate, tails)
        return self._decide(step, "hold", schedule, None, tails)

    def observe(self, step: int, live_tails) -> Schedule | None:
        """Feed the live per-bin tails of a schedule this re-planner switched to; a TailGuard raises failing bins."""
        if self.guard is None:
            return None
        changes = self.guard.update(step, live_tails)
        if not changes:
            return None
        new = self.guard.schedule
        self._record(ReplanEvent(step, "guard", "", new.describe(), [], list(new.budgets), threshold=self.guard.tau))
        return new

    def _decide(self, step, action, old: Schedule, new: Schedule | None, tails) -> tuple[Schedule | None, ReplanEvent]:
        target = new or old
        event = ReplanEvent(
            step=step, action=action, old=old.describe(), new=target.describe(), old_budgets=list(old.budgets),
            new_budgets=list(target.budgets), tails=tails, threshold=self.settings.tau + self.settings.margin,
            speedup_old=self.predicted_speedup(old), speedup_new=self.predicted_speedup(target),
        )
        self._record(event)
        if new is not None:
            self._arm_guard(new, old)
        return new, event

    def _arm_guard(self, schedule: Schedule, previous: Schedule) -> None:
        from sparrow_sgl.tailguard import TailGuard

        grid = {b for s in (schedule, previous, *self.history) for b in s.budgets if b is not None}
        self.guard = TailGuard(schedule, tau=self.settings.tau, grid=sorted(grid), min_count=self.settings.min_count)

    def _record(self, event: ReplanEvent) -> None:
        self.events.append(event)
        log.info(event.summary())
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(event.to_dict()) + "\n")


class _LengthRecorder:
    """Passes calls through, remembering the response lengths generated (for the cost model's prediction)."""

    def __init__(self, engine, lengths: list[int]) -> None:
        self.engine, self.lengths = engine, lengths

    def generate(self, *args, **kwargs):
        rollouts = self.engine.generate(*args, **kwargs)
        self.lengths.extend(len(r.token_ids) for r in rollouts)
        return rollouts

    def score(self, *args, **kwargs):
        return self.engine.score(*args, **kwargs)


def replan_log_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "distill" / "replan.jsonl"
