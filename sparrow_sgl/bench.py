"""`sparrow bench NAME [ARGS...]`: run a benchmark from the repository's bench/ folder (prints JSON).

    sparrow bench attention --contexts 8k,32k --batches 8
    sparrow bench selection --help
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "attention": "dense FlashInfer decode vs the block-sparse step (selection + update + attention)",
    "selection": "page selection and summary update as a share of the sparse step",
    "decode_e2e": "end-to-end CUDA-graph decode step of Qwen3-shaped models, dense vs the 0.86 presets",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark (see NAME --help)")


def load(name: str):
    """Import bench.<name>, from the checkout beside this package when `bench` is not importable."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("bench", f"bench.{name}"):
            raise
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / f"{name}.py").is_file():
        raise FileNotFoundError(f"benchmark scripts not found under {root / 'bench'} (run from a source checkout)")
    sys.path.insert(0, str(root))
    return importlib.import_module(f"bench.{name}")


def run(args: argparse.Namespace) -> int:
    module = load(args.name)
    module.main(args.bench_args)
    return 0
