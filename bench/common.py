"""Shared benchmark plumbing: device facts, measured copy bandwidth, CUDA timing, JSON records.

Every record carries the GPU's name, torch/triton/flashinfer versions and the UTC date, and is printed as JSON and
appended to `<results_dir>/<name>.json` (a JSON list), so that runs on different cards stay comparable.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from sparrow_sgl.jsonio import write_json_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FLUSH_BYTES = 256 * 1024 * 1024  # > L2 of H100/H200 (50 MB): each timed run starts from a cold cache


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "flashinfer"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing or broken optional package is just reported absent
            out[name] = None
    return out


def device_info() -> dict:
    """GPU name, memory, SM count, versions and the date of this run."""
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **versions()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "sm_count": props.multi_processor_count}
    else:
        info["gpu"] = None
    return info


def time_us(fn: Callable[[], object], reps: int = 20, warmup: int = 3, flush: bool = True) -> dict:
    """Median / min / p20 / p80 microseconds of fn on the current stream, CUDA events around each run."""
    flusher = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if flusher is not None:
            flusher.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median_us": round(statistics.median(times), 2), "min_us": round(times[0], 2),
            "p20_us": round(q[0], 2), "p80_us": round(q[-1], 2)}


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """Capture fn (after warm-up runs on a side stream, as CUDA graphs require)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def graph_time_us(fn: Callable[[], object], reps: int = 20, warmup: int = 3, flush: bool = True) -> dict:
    """time_us of a CUDA-graph replay of fn: launch gaps gone, as in an engine's captured decode step."""
    graph = capture_graph(fn)
    return time_us(graph.replay, reps, warmup, flush)


def copy_bandwidth_gbs(nbytes: int = 2 * 2**30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (the bytes floor's rate)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = time_us(lambda: dst.copy_(src), reps=reps, warmup=2, flush=False)["median_us"]
    return round(2 * nbytes / (t * 1e-6) / 1e9, 1)


def results_dir(override: str | None = None) -> Path:
    return Path(override or os.environ.get("SPARROW_BENCH_RESULTS") or RESULTS_DIR)


def emit(name: str, record: dict, out_dir: str | Path | None = None) -> dict:
    """Print the record as one JSON line and append it to <out_dir>/<name>.json (a JSON list)."""
    print(json.dumps(record), flush=True)
    path = results_dir(None if out_dir is None else str(out_dir)) / f"{name}.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    write_json_atomic(path, [*runs, record])
    return record


def progress(name: str, row: dict, out_dir: str | Path | None = None) -> None:
    """Append one row to <out_dir>/<name>.partial.jsonl as it is measured (kept if the run is cut short)."""
    path = results_dir(None if out_dir is None else str(out_dir)) / f"{name}.partial.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def parse_ints(text: str) -> list[int]:
    """'512,1k,8K' -> [512, 1024, 8192]."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        out.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    return out


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
