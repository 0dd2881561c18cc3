"""Per-request sparsity state inside the SGLang scheduler process: which schedule a request decodes with, and how
many KV tokens its sparse steps attended (reported back in the response's `meta_info["sparrow"]`).

A request picks its schedule with `sampling_params.custom_params = {"sparrow_schedule": SPEC}` where SPEC is
"dense", "fixed:1024", a preset name, a schedule JSON object, or that object as a JSON string; a request never makes
the server read a file (schedule files come only from the server's own command line). Without it the server default
applies: the `SPARROW_SCHEDULE` environment variable (set by `sparrow serve --schedule` / `--sparrow-schedule`, which
may name a JSON file), else dense. A per-request schedule may change the budgets only: page size, sink/local pages,
scorer and dense layers must match the server's (they shape the KV summaries).
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparrow_sgl.config import ConfigError, Schedule, SparsityConfig
from sparrow_sgl.schedule import preset_names, resolve_schedule

SCHEDULE_KEY = "sparrow_schedule"  # in sampling_params.custom_params
META_KEY = "sparrow"  # in the response's meta_info
ENV_SCHEDULE = "SPARROW_SCHEDULE"
FIELD_TYPES = {  # JSON type of each schedule field a request may send (budgets: checked by `Schedule`)
    "page_size": "an integer",
    "bin_tokens": "an integer",
    "sink_pages": "an integer",
    "local_pages": "an integer",
    "tau": "a number",
    "quantile": "a number",
    "dense_layers": "a list of layer indices",
    "scorer": "a string or null",
    "model": "a string or null",
    "name": "a string or null",
}
FIELD_CHECKS = {  # the test of each JSON type above (a bool is no number in JSON)
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "a string or null": lambda v: isinstance(v, str),
    "a list of layer indices": lambda v: isinstance(v, list)
    and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
}
INT32_MAX = 2**31 - 1
MAX_TRACKED = 65536  # requests whose state is kept; the oldest go first (aborted requests never report)


@dataclass
class RequestSparsity:
    schedule: Schedule
    kv_tokens_sum: float = 0.0  # attended KV tokens summed over (sparse layer, decode step), mean over KV heads
    sparse_steps: int = 0  # (sparse layer, decode step) pairs
    slot: int | None = None  # req_pool slot whose device counters hold this request's CUDA-graph decode steps

    def report(self) -> dict:
        steps = self.sparse_steps
        return {
            "schedule": self.schedule.name or "custom",
            "kv_tokens_mean": self.kv_tokens_sum / steps if steps else None,
            "sparse_layer_steps": steps,
        }


def parse_schedule(spec, allow_files: bool = False) -> Schedule:
    """A schedule from a `sparrow_schedule` value (name, JSON string or JSON object); `allow_files` lets a string name
    a schedule JSON file, for the server's own command line only: a request must not make the server read files."""
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{SCHEDULE_KEY}: not valid JSON ({e.msg} at character {e.pos})") from None
    if isinstance(spec, dict):
        _check_field_types(spec)
        try:
            schedule = Schedule.from_dict(spec, where=SCHEDULE_KEY)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # a value of the right JSON type that Schedule cannot take
            raise ConfigError(f"{SCHEDULE_KEY}: {e}") from None
        schedule.name = schedule.name or "custom"
        return schedule
    if isinstance(spec, str):
        if not allow_files and not _is_named_schedule(spec):
            raise ConfigError(
                f"{SCHEDULE_KEY}: unknown schedule {spec[:80]!r}; a request may give 'dense', 'fixed:N' (N tokens), "
                "the schedule as a JSON object or a preset name (schedule files only on the server's command line); "
                f"presets: {', '.join(preset_names())}"
            )
        schedule = resolve_schedule(spec)
        schedule.name = schedule.name or spec
        return schedule
    raise ConfigError(
        f"{SCHEDULE_KEY} must be a schedule name, 'fixed:N', 'dense' or a JSON object, got {type(spec).__name__}"
    )


def _check_field_types(spec: dict) -> None:
    """The JSON type of each schedule field (budgets: `Schedule`'s own check), so that e.g. `"sink_pages": "1"` is
    refused naming its field rather than failing inside `Schedule` with a bare TypeError."""
    for key, kind in FIELD_TYPES.items():
        value = spec.get(key)
        if value is None and kind == "a string or null":
            continue
        if key in spec and not FIELD_CHECKS[kind](value):
            raise ConfigError(f"{SCHEDULE_KEY}: {key} must be {kind}, got {json.dumps(value)[:40]}")


def _is_named_schedule(spec: str) -> bool:
    name = spec.strip()
    return name == "dense" or name.startswith("fixed:") or name in preset_names()


@functools.cache
def server_schedule() -> Schedule:
    """The server's default schedule (read once per process from `SPARROW_SCHEDULE`)."""
    return parse_schedule(os.environ.get(ENV_SCHEDULE) or "dense", allow_files=True)


def server_sparsity() -> SparsityConfig:
    """Page size, sink/local pages, scorer and dense layers every request on this server shares (KV layout NHD)."""
    cfg = server_schedule().sparsity()
    cfg.kv_layout = "NHD"  # SGLang's buffer [slots, kv_heads, dim] viewed as [pages, page_size, kv_heads, dim]
    return cfg


def request_schedule(custom_params) -> Schedule:
    """The schedule a request asked for (validated against the server's sparsity settings), else the default."""
    spec = custom_params.get(SCHEDULE_KEY) if isinstance(custom_params, dict) else None
    if spec is None:
        return server_schedule()
    schedule = parse_schedule(spec)
    _check_compatible(schedule, server_schedule())
    _check_graph_table(schedule)
    return schedule


def _check_graph_table(schedule: Schedule) -> None:
    """A GPU server's decode graphs keep each request's bins in an int32 device table of MAX_BINS rows, filled in the
    scheduler (`graph_state.bind`), where a schedule that does not fit raises and takes the server down."""
    from sparrow_sgl.engine.cuda_graph import MAX_BINS

    if len(schedule.budgets) > MAX_BINS:
        raise ConfigError(f"{SCHEDULE_KEY}: {len(schedule.budgets)} budget bins; a request may give at most {MAX_BINS}")
    if schedule.bin_tokens > INT32_MAX:
        raise ConfigError(f"{SCHEDULE_KEY}: bin_tokens {schedule.bin_tokens} is above {INT32_MAX}")


def _check_compatible(schedule: Schedule, server: Schedule) -> None:
    for name in ("page_size", "sink_pages", "local_pages", "scorer", "dense_layers"):
        mine, theirs = getattr(schedule, name), getattr(server, name)
        if mine != theirs:
            raise ConfigError(
                f"{SCHEDULE_KEY}: {name}={mine!r} differs from the server's {theirs!r}; a per-request schedule may "
                "change the budgets only"
            )


class RequestRegistry:
    """rid -> RequestSparsity for the requests this scheduler serves, plus the last step's unflushed statistics."""

    def __init__(self) -> None:
        self.active = False  # set once a sparrow backend exists in this process
        self._requests: OrderedDict[str, RequestSparsity] = OrderedDict()
        self._pending: tuple[list[str], torch.Tensor, int] | None = None
        # (attended tokens, steps) accumulated on the device for a req_pool slot by CUDA-graph decode steps
        self.slot_reader: Callable[[int], tuple[float, int]] | None = None
        self.slot_owner: dict[int, str] = {}  # req_pool slot -> rid whose graph steps its counters hold

    def add(self, rid: str, custom_params) -> None:
        if not self.active:
            return
        try:
            schedule = request_schedule(custom_params)
        except ConfigError:  # refused at the tokenizer already; keep serving with the default
            schedule = server_schedule()
        self._requests[rid] = RequestSparsity(schedule)
        while len(self._requests) > MAX_TRACKED:
            self._requests.popitem(last=False)

    def get(self, rid: str) -> RequestSparsity:
        state = self._requests.get(rid)
        if state is None:  # e.g. a request created before the backend existed
            state = self._requests[rid] = RequestSparsity(server_schedule())
        return state

    def bind_slot(self, rid: str, slot: int) -> bool:
        """Let `slot`'s device counters hold rid's graph steps; returns whether they must restart from zero.

        The same request on the same slot (a chunked prefill's next chunk) keeps counting. Otherwise the counts
        already on the device move into host totals first: the slot's previous owner's while it is still served
        (a retracted request), and rid's own from its previous slot (a retracted request admitted again)."""
        state = self.get(rid)
        if state.slot == slot and self.slot_owner.get(slot) == rid:
            return False
        owner = self.slot_owner.get(slot)
        if owner is not None and owner != rid:
            self.fold_slot(owner)
        self.fold_slot(rid)
        state.slot, self.slot_owner[slot] = slot, rid
        return True

    def fold_slot(self, rid: str) -> None:
        """Move a request's graph-step counts from its slot's device counters into its host totals; unbind it."""
        state = self._requests.get(rid)
        if state is None or state.slot is None:
            return
        slot, state.slot = state.slot, None
        if self.slot_owner.get(slot) != rid:  # the slot went to another request, which folded these counts already
            return
        del self.slot_owner[slot]
        if self.slot_reader is not None:
            tokens, steps = self.slot_reader(slot)
            state.kv_tokens_sum += tokens
            state.sparse_steps += steps

    def record_step(self, rids: list[str], attended_sum: torch.Tensor, sparse_layers: int) -> None:
        """Keep a decode step's per-request attended tokens (summed over sparse layers) without syncing the device."""
        self.flush()
        self._pending = (list(rids), attended_sum, sparse_layers)

    def flush(self) -> None:
        if self._pending is None:
            return
        rids, attended, layers = self._pending
        self._pending = None
        if layers == 0:
            return
        for rid, tokens in zip(rids, attended.tolist()):
            state = self._requests.get(rid)
            if state is not None:
                state.kv_tokens_sum += tokens
                state.sparse_steps += layers

    def pop_report(self, rid: str) -> dict | None:
        self.flush()
        self.fold_slot(rid)
        state = self._requests.pop(rid, None)
        return state.report() if state is not None else None


REGISTRY = RequestRegistry()
