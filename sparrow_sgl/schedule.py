"""Schedules by name: the paper's released presets, `dense`, `fixed:N`, or a JSON file."""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from importlib import resources
from pathlib import Path

from sparrow_sgl.config import ConfigError, Schedule

__all__ = ["Schedule", "preset_names", "load_preset", "resolve_schedule", "with_bin_width"]


@cache
def _paper_presets() -> dict:
    return json.loads(resources.files("sparrow_sgl.data").joinpath("paper_presets.json").read_text())


def preset_names() -> list[str]:
    return sorted(_paper_presets()["presets"])


def load_preset(name: str) -> Schedule:
    """A released per-bin schedule as a `Schedule` (budgets in tokens, sink+local pages included)."""
    data = _paper_presets()
    presets = data["presets"]
    if name not in presets:
        raise ConfigError(f"unknown schedule preset {name!r}; known presets: {', '.join(sorted(presets))}")
    page_size, reserved = data["page_size"], data["reserved_pages"]
    tau = float(name.rsplit("-", 1)[-1])
    return Schedule(
        budgets=[(pages + reserved) * page_size for pages in presets[name]],
        page_size=page_size,
        bin_tokens=data["bin_tokens"],
        tau=tau,
        dense_layers=list(data["dense_layers"]),
        model=name.rsplit("-", 1)[0],
        name=name,
    )


def resolve_schedule(spec: str | Schedule | None, page_size: int = 16) -> Schedule:
    """`dense`, `fixed:1024`, a preset name, or a path to a schedule JSON file."""
    if spec is None:
        return Schedule.dense(page_size=page_size)
    if isinstance(spec, Schedule):
        return spec
    spec = str(spec).strip()
    if spec == "dense":
        return Schedule.dense(page_size=page_size)
    if spec.startswith("fixed:"):
        value = spec.removeprefix("fixed:").strip()
        if value.startswith("-") and value[1:].isdigit():
            raise ConfigError(f"{spec!r}: the budget is negative; a budget is a positive number of tokens (fixed:1024)")
        if not value.isdigit():
            raise ConfigError(f"fixed schedule needs an integer token budget, e.g. fixed:1024, got {spec!r}")
        return Schedule.fixed(int(value), page_size=page_size)
    if spec in _paper_presets()["presets"]:
        return load_preset(spec)
    if spec.endswith(".json") or Path(spec).exists():
        return Schedule.load(spec)
    raise ConfigError(
        f"unknown schedule {spec!r}: use 'dense', 'fixed:N', a schedule JSON file, "
        f"or one of {', '.join(preset_names())}"
    )


def with_bin_width(schedule: Schedule, bin_tokens: int) -> Schedule:
    """A one-budget schedule takes the run's bin width (its budget is the same in every bin, but the TailGuard and
    the live tails compare per bin); any other schedule is returned as it is."""
    if len(schedule.budgets) == 1 and schedule.bin_tokens != bin_tokens:
        return dataclasses.replace(schedule, bin_tokens=bin_tokens)
    return schedule
