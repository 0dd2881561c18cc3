"""TailGuard between OpenRLHF steps, and its state across `--ckpt.load_enable` restarts.

The guard lives in the process that measures the tails (OpenRLHF's experience maker, tails.py). After every update
its state and the schedule it produced go to `<--sparrow.out_dir>/guard_state.json`; a changed schedule goes to
every engine (`set_schedule`, engines found by name) before the next rollout. On a resumed run (`--ckpt.load_enable`)
the engines start on the saved schedule (factory.py) and the guard continues from the saved state. The file holds
the latest update, which can be up to `--ckpt.save_steps` steps newer than the model checkpoint OpenRLHF resumes
from: the guard is a feedback loop, so it resumes from its newest measurement rather than an older one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sparrow_sgl.config import Schedule
from sparrow_sgl.jsonio import write_json_atomic
from sparrow_sgl.mismatch import BinStat
from sparrow_sgl.schedule import resolve_schedule, with_bin_width
from sparrow_sgl.tailguard import TailGuard

STATE_FILE = "guard_state.json"
log = logging.getLogger(__name__)


def initial_schedule(sparrow) -> Schedule:
    """`--sparrow.schedule`, with a one-budget schedule taking the run's bin width (the guard compares per bin)."""
    return with_bin_width(resolve_schedule(sparrow.schedule), sparrow.bin_tokens)


def load_state(out_dir: str | None) -> dict | None:
    path = Path(out_dir or "") / STATE_FILE
    return json.loads(path.read_text()) if out_dir and path.is_file() else None


def save_state(out_dir: str | None, step: int, guard: TailGuard) -> None:
    if out_dir:
        write_json_atomic(Path(out_dir) / STATE_FILE,
                          {"step": step, "guard": guard.state_dict(), "schedule": guard.schedule.to_dict()})


def resumed_schedule(sparrow, load_enable: bool) -> dict | None:
    """The schedule a resumed run's engines start on (None: a fresh run, or nothing saved)."""
    state = load_state(sparrow.out_dir) if load_enable and sparrow.guard else None
    return state["schedule"] if state else None


def push_schedule(num_engines: int, spec: dict, timeout_s: float) -> list[str]:
    from sparrow_sgl.openrlhf.engine_group import call_all

    return call_all(num_engines, "set_schedule", spec, timeout_s=timeout_s)


def guard_step(maker, stats: list[BinStat]) -> dict:
    """One TailGuard update on this batch's tails (experience maker process); returns metrics for OpenRLHF's log."""
    args = maker.strategy.args
    sparrow = args.sparrow
    guard = getattr(maker, "sparrow_guard", None)
    if guard is None:
        guard = maker.sparrow_guard = TailGuard(initial_schedule(sparrow), tau=sparrow.tau)
        state = load_state(sparrow.out_dir) if args.ckpt.load_enable else None
        maker.sparrow_step = 0
        if state is not None:
            guard.load_state_dict(state["guard"])
            maker.sparrow_step = int(state["step"])
    step = maker.sparrow_step = maker.sparrow_step + 1
    before = list(guard.budgets)
    events = guard.update(step, stats)
    if guard.budgets != before:
        described = push_schedule(args.vllm.num_engines, guard.schedule.to_dict(), sparrow.sync_timeout)
        log.info("TailGuard step %d: %s -> engines now %s", step, [e.to_dict() for e in events], described[0])
    save_state(sparrow.out_dir, step, guard)
    return {"sparrow/guard_events": float(len(events)),
            "sparrow/schedule_budget_max": float(max((b or 0) for b in guard.budgets))}
