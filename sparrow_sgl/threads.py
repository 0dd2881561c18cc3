"""CPU thread settings chosen for the machine's current load, not only its core count.

On a busy machine OpenMP's default (active) wait policy makes every intra-op thread spin between parallel regions,
so a torch process with one thread per core and one other busy process share the cores badly: `sparrow demo
--quick` took 2.8x its quiet time beside one busy loop on 2 cores (bench/demo_load.py). Two settings fix it:

- `OMP_WAIT_POLICY=PASSIVE`: idle OpenMP threads sleep instead of spinning. It is read once, when OpenMP starts,
  so `apply_process_policy()` sets it in the CLI entry before torch is imported.
- intra-op threads = the cores this process may use minus the cores other processes keep busy (at least 1).

Environment: a user-set `OMP_WAIT_POLICY` / `OMP_NUM_THREADS` is respected; `SPARROW_THREADS=N` fixes the thread
count; `SPARROW_THREADS=legacy` restores the old behaviour (no policy: torch's default threads, active waiting).
This module imports nothing heavy: it must run before torch.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

ENV = "SPARROW_THREADS"
LEGACY = "legacy"


@dataclass(slots=True)
class ThreadPlan:
    """Intra-op threads for this process and why."""

    threads: int
    cores: int  # CPUs this process may run on (affinity)
    busy: float  # cores other processes keep busy (load estimate)
    reason: str

    def describe(self) -> str:
        return f"{self.threads} torch thread(s): {self.reason}"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; the whole machine where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def runnable_others(samples: int = 5, interval_s: float = 0.01) -> float | None:
    """Tasks other than this process's running thread that are runnable right now (median of a few samples of
    /proc/loadavg's running count); None where /proc is missing."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            return None
        counts.append(max(0, running - 1))  # the reader itself is running
        if i + 1 < samples:
            time.sleep(interval_s)
    return float(sorted(counts)[len(counts) // 2])


def busy_cores(include_average: bool = True) -> float:
    """Cores other processes keep busy: the larger of the 1-minute load average (lags a newly started process)
    and the tasks runnable now. `include_average=False` once this process has run a while (its own work is in
    the average)."""
    now = runnable_others()
    average = 0.0
    if include_average and hasattr(os, "getloadavg"):
        try:
            average = os.getloadavg()[0]
        except OSError:
            average = 0.0
    return max(average, now or 0.0)


def plan_threads(cores: int | None = None, busy: float | None = None, include_average: bool = True) -> ThreadPlan:
    """Threads = usable cores minus busy cores (rounded), within [1, cores]; `SPARROW_THREADS=N` fixes it."""
    cores = usable_cores() if cores is None else cores
    fixed = os.environ.get(ENV, "")
    if fixed.isdigit() and int(fixed) > 0:
        return ThreadPlan(min(int(fixed), cores), cores, 0.0, f"{ENV}={fixed}")
    busy = busy_cores(include_average) if busy is None else busy
    threads = max(1, min(cores, round(cores - busy)))
    return ThreadPlan(threads, cores, busy, f"{cores} usable core(s), about {busy:.1f} kept busy by other processes")


def legacy() -> bool:
    return os.environ.get(ENV, "").strip().lower() == LEGACY


def apply_process_policy() -> ThreadPlan | None:
    """Before torch is imported: passive OpenMP waiting and a load-aware `OMP_NUM_THREADS`, unless the user set
    them (or `SPARROW_THREADS=legacy`). Returns the plan applied, None when nothing was changed."""
    global _APPLIED
    if legacy() or "torch" in sys.modules:  # OpenMP reads these once, when torch starts it
        return None
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _APPLIED = True
    if "OMP_NUM_THREADS" in os.environ:
        return None
    plan = plan_threads()
    os.environ["OMP_NUM_THREADS"] = str(plan.threads)
    return plan


def retune_torch_threads(verbose: bool = False) -> ThreadPlan | None:
    """Between long stages: set torch's intra-op threads again from the load now (this process's own work is
    excluded: only the tasks runnable at this instant count). No-op unless `apply_process_policy()` ran in this
    process, and when the user fixed OMP_NUM_THREADS."""
    if not _APPLIED or legacy() or _user_fixed_threads():
        return None
    import torch

    plan = plan_threads(include_average=False)
    if plan.threads != torch.get_num_threads():
        torch.set_num_threads(plan.threads)
        if verbose:
            print(f"sparrow: {plan.describe()}", file=sys.stderr)
    return plan


_USER_SET_OMP = "OMP_NUM_THREADS" in os.environ  # before apply_process_policy() writes it
_APPLIED = False


def _user_fixed_threads() -> bool:
    return _USER_SET_OMP or os.environ.get(ENV, "").isdigit()
