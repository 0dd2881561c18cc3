"""`sparrow demo --quick` wall time on a quiet vs a busy machine, with the old and the new CPU thread settings.

    python bench/demo_load.py [--repeats 1] [--cpus 0,1] [--out bench/results/demo_load.json]

Each run is a fresh `python -m sparrow_sgl.cli demo --quick --no-progress` process (OpenMP settings are read once,
at start). "busy" starts one pure-Python busy loop first (on the same CPUs) and stops it afterwards. "before" sets
`SPARROW_THREADS=legacy` (torch's default: one intra-op thread per core, OpenMP's active spin-waiting); "after" is
the default policy of sparrow_sgl/threads.py (passive waiting, threads = usable cores - busy cores). `--cpus`
pins the demo and the busy loop to those CPUs (e.g. a 2-core laptop on a larger host). The machine's own load is
sampled during every run and reported: other processes change the result. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BUSY_LOOP = "while True:\n    pass\n"
OMP_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "SPARROW_THREADS")


class LoadSampler:
    """1-minute load average and runnable tasks (/proc/loadavg), sampled once a second in a thread."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/loadavg") as f:
                parts = f.read().split()
            self.samples.append((float(parts[0]), int(parts[3].split("/")[0]) - 1))
            self._stop.wait(1.0)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        loads, running = zip(*self.samples)
        return {"loadavg_1min_mean": round(sum(loads) / len(loads), 2),
                "runnable_others_mean": round(sum(running) / len(running), 2)}


def _pin(cpus: list[int] | None):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def run_demo(policy: str, busy: bool, cpus: list[int] | None, repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    if policy == "before":
        env["SPARROW_THREADS"] = "legacy"
    hog = None
    if busy:
        hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=_pin(cpus))
        time.sleep(2.0)  # let it show in the runnable count
    try:
        with tempfile.TemporaryDirectory() as out, LoadSampler() as load:
            cmd = [sys.executable, "-m", "sparrow_sgl.cli", "demo", "--quick", "--no-progress", "--out", out]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, preexec_fn=_pin(cpus))
            wall = time.perf_counter() - start
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({policy}, busy={busy}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    threads = sorted({line.split()[0] for line in proc.stdout.splitlines() if "torch thread(s):" in line})
    return {"policy": policy, "condition": "busy" if busy else "quiet", "wall_s": round(wall, 1),
            "torch_threads": threads or ["default"], **load.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (policy, condition) pair")
    parser.add_argument("--cpus", default=None, help="pin demo and busy loop to these CPUs, e.g. 0,1")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    cpus = [int(c) for c in args.cpus.split(",")] if args.cpus else None
    repo = Path(__file__).resolve().parents[1]
    rows = []
    for _ in range(args.repeats):  # interleaved, so drifting background load hits every pair alike
        for busy in (False, True):
            for policy in ("before", "after"):
                rows.append(run_demo(policy, busy, cpus, repo))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "bench": "demo_load",
        "command": "python bench/demo_load.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "usable_cpus": len(cpus) if cpus else len(os.sched_getaffinity(0)),
        "machine_cpus": os.cpu_count(),
        "rows": rows,
        "median_wall_s": _medians(rows),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


def _medians(rows: list[dict]) -> dict:
    out = {}
    for policy in ("before", "after"):
        for condition in ("quiet", "busy"):
            walls = sorted(r["wall_s"] for r in rows if r["policy"] == policy and r["condition"] == condition)
            if walls:
                out[f"{policy}/{condition}"] = walls[len(walls) // 2]
        if f"{policy}/quiet" in out and f"{policy}/busy" in out:
            out[f"{policy}/busy_over_quiet"] = round(out[f"{policy}/busy"] / out[f"{policy}/quiet"], 2)
    return out


if __name__ == "__main__":
    main()
