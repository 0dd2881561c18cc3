"""Measured small-M GEMM choices per GPU, shipped so `SPARROW_LINEAR=auto` need not time known shapes at startup.

`engine/linear.py` times cuBLAS against the Triton candidates the first time it meets a shape. Timing is noisy, so
two runs (or two engines) could pick different kernels for the same shape and round differently; on a GPU named in
`sparrow_sgl/data/linear_choices.json` the table's choice is taken instead: reproducible, and no candidate compiles.
The table is built from `bench.gemm_small_m`'s tune rows (the same timing as the engine's, `--write-choices`).
`SPARROW_LINEAR_TABLE=0` ignores it (always time); `SPARROW_LINEAR_TABLE=PATH` reads another table.

Shapes the table lacks (other models, other GPUs) are timed once per machine: the winners are kept in this machine's
cache (`~/.cache/sparrow_sgl/linear_choices-torch<v>-triton<v>.json`, in $XDG_CACHE_HOME if set; the versions are in
the name because cuBLAS and Triton's code generation change with them), so later engines (every rollout actor of a
run, every later run) take the same choice without compiling or timing. `SPARROW_LINEAR_CACHE=PATH` names another
file, `=0` turns it off. The cache has the table's format, so it can also be handed to `SPARROW_LINEAR_TABLE`.

Format: {gpu name: {"M,N,K,dtype,bias,silu,pdl": "cublas" | [block_n, block_k, split_k, num_warps, num_stages]}}
with M the power-of-two row bucket and the flags 0/1.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from functools import cache
from importlib import metadata, resources
from pathlib import Path

import torch

from sparrow_sgl.errors import ConfigError
from sparrow_sgl.jsonio import read_json, write_json_atomic

TABLE_ENV = "SPARROW_LINEAR_TABLE"
CACHE_ENV = "SPARROW_LINEAR_CACHE"
CUBLAS = "cublas"


def table_key(m_bucket: int, n: int, k: int, dtype: torch.dtype, bias: bool, silu: bool, pdl: bool) -> str:
    return f"{m_bucket},{n},{k},{str(dtype).removeprefix('torch.')},{int(bias)},{int(silu)},{int(pdl)}"


@cache
def _read(source: str) -> dict:
    if source == "shipped":
        return json.loads(resources.files("sparrow_sgl.data").joinpath("linear_choices.json").read_text())
    table = read_json(source, f"{TABLE_ENV} table")
    problem = table_problem(table)
    if problem:
        raise ConfigError(f"{TABLE_ENV} table {source}: {problem}")
    return table


def table_problem(table) -> str | None:
    """What is wrong with a choice table, or None: {gpu name: {shape key: "cublas" | 5 positive ints}}."""
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        return "expected {gpu name: {shape key: choice}}"
    for gpu, choices in table.items():
        for key, choice in choices.items():
            if choice != CUBLAS and not (isinstance(choice, list) and len(choice) == 5
                                         and all(isinstance(v, int) and v > 0 for v in choice)):
                return f"{gpu} {key}: {choice!r} is neither {CUBLAS!r} nor [block_n, block_k, split_k, warps, stages]"
    return None


def load_table() -> dict:
    """The table in use: the shipped one, another file (SPARROW_LINEAR_TABLE=PATH) or none (=0)."""
    source = os.environ.get(TABLE_ENV, "").strip() or "shipped"
    return {} if source == "0" else _read(source)


def lookup(table: dict, gpu: str, key: str) -> tuple[bool, tuple[int, ...] | None]:
    """(found, choice): choice None = cuBLAS, else the Triton config as a tuple."""
    entry = table.get(gpu, {}).get(key)
    if entry is None:
        return False, None
    return True, None if entry == CUBLAS else tuple(int(v) for v in entry)


def table_from_tune_rows(rows: list[dict]) -> dict:
    """{gpu: {key: choice}} from `bench.gemm_small_m` tune rows (bf16, no bias); a later row wins."""
    table: dict[str, dict[str, object]] = {}
    for r in rows:
        if r.get("kind") != "tune" or not r.get("gpu"):
            continue
        faster = r["triton_us"] is not None and r["triton_us"] < r["cublas_us"]
        key = table_key(1 << (r["m"] - 1).bit_length(), r["n"], r["k"], torch.bfloat16, False,
                        r["gemm"].endswith("+silu"), bool(r["pdl"]))
        table.setdefault(r["gpu"], {})[key] = list(r["config_n_k_split_warps_stages"]) if faster else CUBLAS
    return table


def cache_path() -> Path | None:
    """This machine's file of timed choices (SPARROW_LINEAR_CACHE=PATH, =0 none), by default in the user cache."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting == "0":
        return None
    if setting:
        return Path(setting).expanduser()
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory (some containers): no cache, every process times
        return None
    return root / "sparrow_sgl" / f"linear_choices-torch{torch.__version__}-triton{_triton_version()}.json"


def _triton_version() -> str:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "none"


def read_cache(path: Path | None) -> dict:
    """The cached table; {} if there is none. An unreadable or malformed cache is reported and ignored (it only
    saves time): the shapes are timed again and the file rewritten."""
    if path is None or not path.is_file():
        return {}
    try:
        table = read_json(path, "GEMM choice cache")
    except (OSError, ConfigError) as e:
        print(f"sparrow linear: ignoring the GEMM choice cache {path} ({e})", file=sys.stderr)
        return {}
    problem = table_problem(table)
    if problem:
        print(f"sparrow linear: ignoring the GEMM choice cache {path} ({problem})", file=sys.stderr)
        return {}
    return table


def remember(path: Path | None, gpu: str, key: str, choice: tuple[int, ...] | None) -> None:
    """Add one timed choice to the cache. Engines of one machine may write at once (a run's rollout actors): the
    file is re-read under an exclusive lock and replaced atomically, so no entry is lost and no reader sees half a
    file. A cache that cannot be written is reported and skipped: the choice still holds for this process."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table = read_cache(path)
            table.setdefault(gpu, {})[key] = CUBLAS if choice is None else list(choice)
            write_json_atomic(path, table)
    except OSError as e:
        print(f"sparrow linear: cannot write the GEMM choice cache {path} ({e})", file=sys.stderr)

