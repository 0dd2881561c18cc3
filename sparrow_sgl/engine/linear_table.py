"""Measured small-M GEMM choices per GPU, shipped so `SPARROW_LINEAR=auto` need not time known shapes at startup.

`engine/linear.py` times cuBLAS against the Triton candidates the first time it meets a shape. Timing is noisy, so
two runs (or two engines) could pick different kernels for the same shape and round differently; on a GPU named in
`sparrow_sgl/data/linear_choices.json` the table's choice is taken instead: reproducible, and no candidate compiles.
The table is built from `bench.gemm_small_m`'s tune rows (the same timing as the engine's, `--write-choices`).
`SPARROW_LINEAR_TABLE=0` ignores it (always time); `SPARROW_LINEAR_TABLE=PATH` reads another table.

Format: {gpu name: {"M,N,K,dtype,bias,silu,pdl": "cublas" | [block_n, block_k, split_k, num_warps, num_stages]}}
with M the power-of-two row bucket and the flags 0/1.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources

import torch

from sparrow_sgl.errors import ConfigError
from sparrow_sgl.jsonio import read_json

TABLE_ENV = "SPARROW_LINEAR_TABLE"
CUBLAS = "cublas"


def table_key(m_bucket: int, n: int, k: int, dtype: torch.dtype, bias: bool, silu: bool, pdl: bool) -> str:
    return f"{m_bucket},{n},{k},{str(dtype).removeprefix('torch.')},{int(bias)},{int(silu)},{int(pdl)}"


@cache
def _read(source: str) -> dict:
    if source == "shipped":
        return json.loads(resources.files("sparrow_sgl.data").joinpath("linear_choices.json").read_text())
    table = read_json(source, f"{TABLE_ENV} table")
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ConfigError(f"{TABLE_ENV} table {source}: expected {{gpu name: {{shape key: choice}}}}")
    return table


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
