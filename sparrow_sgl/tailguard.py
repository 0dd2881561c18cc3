"""TailGuard: keeps every position bin's live acceptance-rate tail >= tau during training by moving its budget.

Rules per bin, at each `update(step, tails)` with the tails measured on that step's rollouts:
- tail < tau: raise the budget one step up the grid (or straight to the smallest budget the calibration table
  says holds tau there, if that is higher); the top of the grid is followed by dense, never anything above it.
- tail >= tau + headroom for `patience` consecutive measured updates: lower it one step down the grid.
- tail in [tau, tau + headroom): hold, and restart the headroom count. This dead band is the hysteresis: noise
  inside it never moves a budget.
- a lowered budget that then dips below tau is raised back and its bin's patience is multiplied by `backoff`,
  so a bin sitting right at its limit does not cycle.
Budgets stay non-decreasing with position (a raise lifts later bins, a lower stops at the previous bin), like the
planner's schedules. Every change is an event (step, bin, old, new, tail, reason), logged and kept in `events`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.mismatch import BinStat

log = logging.getLogger(__name__)

RAISE, LOWER, MONOTONE = "raise", "lower", "monotone"


@dataclass(slots=True)
class GuardEvent:
    step: int
    bin: int
    old: int | None  # tokens; None = dense
    new: int | None
    tail: float | None  # live tail that triggered the change (None for a monotone follow-up)
    reason: str  # raise | lower | monotone

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rank(budget: int | None) -> float:
    return float("inf") if budget is None else float(budget)


class TailGuard:
    def __init__(
        self,
        schedule: Schedule,
        *,
        tau: float | None = None,
        headroom: float = 0.02,
        patience: int = 5,
        backoff: float = 2.0,
        grid: Sequence[int] | None = None,
        calibration=None,
        min_count: int = 20,
        monotone: bool = True,
    ):
        self.tau = float(schedule.tau if tau is None else tau)
        if not 0.0 < self.tau < 1.0:
            raise ConfigError(f"tau must lie in (0, 1), got {self.tau}")
        if headroom <= 0 or patience < 1 or backoff < 1.0:
            raise ConfigError(f"need headroom > 0, patience >= 1, backoff >= 1 (got {headroom}, {patience}, {backoff})")
        self.headroom, self.patience, self.backoff = float(headroom), int(patience), float(backoff)
        self.calibration, self.min_count, self.monotone = calibration, int(min_count), monotone
        self._base = schedule
        self.grid = self._make_grid(schedule, grid, calibration)
        self.budgets: list[int | None] = list(schedule.budgets)
        self.streak = [0] * len(self.budgets)  # consecutive updates with headroom, per bin
        self.scale = [1.0] * len(self.budgets)  # patience multiplier, grows when a lowered level fails
        self.lowered = [False] * len(self.budgets)  # the bin's last move was down
        self.events: list[GuardEvent] = []

    @staticmethod
    def _make_grid(schedule: Schedule, grid, calibration) -> list[int]:
        if grid is None:
            from sparrow_sgl.calibrate import paper_budget_grid

            grid = paper_budget_grid() + (calibration.budget_values() if calibration is not None else [])
        values = {int(g) for g in grid} | {b for b in schedule.budgets if b is not None}
        floor = schedule.sparsity().min_budget
        bad = [g for g in values if g % schedule.page_size or g < floor]
        if bad:
            raise ConfigError(f"grid budgets {sorted(bad)} are not multiples of {schedule.page_size} >= {floor} tokens")
        return sorted(values)

    # -- the current schedule -----------------------------------------------------------------------------------
    @property
    def schedule(self) -> Schedule:
        return dataclasses.replace(self._base, budgets=list(self.budgets))

    # -- updates ------------------------------------------------------------------------------------------------
    def update(self, step: int, tails: Sequence[BinStat] | Sequence[float | None] | Mapping[int, float | None]):
        """Feed one step's live per-bin tails; returns the events (budget changes) this step caused."""
        measured = self._measured(tails)
        if measured:
            self._extend_to(max(measured))
        rolled_out_with = list(self.budgets)  # the budgets these tails were measured under
        new_events: list[GuardEvent] = []
        for i, tail in sorted(measured.items()):
            if tail < self.tau:
                new_events += self._raise(step, i, tail, rolled_out_with[i])
            elif tail >= self.tau + self.headroom:
                self.streak[i] += 1
                if self.streak[i] >= self.patience * self.scale[i]:
                    new_events += self._lower(step, i, tail)
            else:
                self.streak[i] = 0
        for e in new_events:
            log.info("TailGuard step %d bin %d: %s -> %s (%s, tail %s)", e.step, e.bin, e.old, e.new, e.reason, e.tail)
        self.events += new_events
        return new_events

    def _measured(self, tails) -> dict[int, float]:
        if isinstance(tails, Mapping):
            items = tails.items()
        else:
            items = enumerate(tails)
        out = {}
        for i, t in items:
            if isinstance(t, BinStat):
                if t.end - t.start != self._base.bin_tokens:
                    raise ConfigError(
                        f"live tails use {t.end - t.start}-token bins, the schedule {self._base.bin_tokens}"
                    )
                t = t.tail if t.count >= self.min_count else None
            if t is not None:
                out[int(i)] = float(t)
        return out

    def _extend_to(self, i: int) -> None:
        while len(self.budgets) <= i:  # the last budget holds beyond the last bin: copying it changes nothing
            self.budgets.append(self.budgets[-1])
            self.streak.append(0)
            self.scale.append(1.0)
            self.lowered.append(False)

    def _raise(self, step: int, i: int, tail: float, measured_at: int | None) -> list[GuardEvent]:
        self.streak[i] = 0
        if measured_at is None:
            return []  # already dense: nothing above it
        if self.lowered[i]:
            self.scale[i] *= self.backoff
        self.lowered[i] = False
        # one step above the budget the tail was measured at; a monotone lift earlier in this update may already
        # have moved the bin that far or further
        new = self._step_up(i, measured_at)
        if _rank(new) <= _rank(self.budgets[i]):
            return []
        events = [self._set(step, i, new, tail, RAISE)]
        if self.monotone:
            for j in range(i + 1, len(self.budgets)):
                if _rank(self.budgets[j]) < _rank(new):
                    self.streak[j] = 0
                    events.append(self._set(step, j, new, None, MONOTONE))
        return events

    def _lower(self, step: int, i: int, tail: float) -> list[GuardEvent]:
        self.streak[i] = 0
        old = self.budgets[i]
        below = [g for g in self.grid if _rank(g) < _rank(old)]
        if not below:
            return []
        new = below[-1]
        if self.monotone and i > 0 and _rank(new) < _rank(self.budgets[i - 1]):
            new = self.budgets[i - 1]
        if _rank(new) >= _rank(old):
            return []
        self.lowered[i] = True
        return [self._set(step, i, new, tail, LOWER)]

    def _step_up(self, i: int, old: int) -> int | None:
        above = [g for g in self.grid if g > old]
        new = above[0] if above else None
        if self.calibration is not None:
            enough = [b for b in self.calibration.budget_values() if b > old and self._calibrated_ok(b, i)]
            if enough and _rank(enough[0]) > _rank(new):
                new = enough[0]
        return new

    def _calibrated_ok(self, budget: int, i: int) -> bool:
        tail = self.calibration.tail(budget, i, self.min_count)
        return tail is not None and tail >= self.tau

    def _set(self, step: int, i: int, new: int | None, tail: float | None, reason: str) -> GuardEvent:
        event = GuardEvent(int(step), i, self.budgets[i], new, tail, reason)
        self.budgets[i] = new
        return event

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "budgets": list(self.budgets),
            "streak": list(self.streak),
            "scale": list(self.scale),
            "lowered": list(self.lowered),
            "events": [e.to_dict() for e in self.events],
            "tau": self.tau,
            "grid": list(self.grid),
        }

    def load_state_dict(self, state: dict) -> None:
        n = len(state["budgets"])
        if not all(len(state[k]) == n for k in ("streak", "scale", "lowered")):
            raise ConfigError("TailGuard state: per-bin lists differ in length")
        self.budgets = list(state["budgets"])
        self.streak, self.scale, self.lowered = list(state["streak"]), list(state["scale"]), list(state["lowered"])
        self.events = [GuardEvent(**e) for e in state["events"]]
        self.tau = float(state.get("tau", self.tau))
        self.grid = sorted(int(g) for g in state.get("grid", self.grid))
