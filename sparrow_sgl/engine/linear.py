"""The model's linear layers: `nn.Linear` (same parameters and state-dict names) whose forward runs the small-M Triton
GEMM (`attention/kernels/triton_linear.py`) where it measured faster than cuBLAS, else `F.linear`.

The Triton path applies to CUDA bf16/fp16 inputs [M, K] with M <= 64 and no autograd (the decode step's GEMMs);
CPU, float32, M > 64 and anything needing gradients run `F.linear` exactly as `nn.Linear` does. The choice is
`SPARROW_LINEAR` = auto (default) | cublas | triton, read at call time like `fused.py`'s switch (a captured graph
keeps what was chosen while it was captured). `auto` times cuBLAS against the Triton candidates once per (device,
M rounded up to a power of two, N, K, dtype, bias, fused SiLU, PDL) on the first call outside CUDA-graph capture,
with a cold L2 before every run (the weights are 20-250 MB, an H200's L2 50 MB), and caches the winner; a call
inside capture uses the cached choice, cuBLAS when there is none. On a GPU with measured choices for the shape
(`linear_table.py`, shipped for the H200 and the Qwen3 1.7B/4B/8B shapes) those are taken without timing; other
shapes are timed once per machine and kept in a cache file that later engines read (`SPARROW_LINEAR_CACHE`). The
engine's graph capture runs an eager warm-up forward first, so every decode GEMM is timed there.
`SPARROW_LINEAR_PDL=1` launches the Triton GEMMs with programmatic dependent launch (opt-in; sm_90+), and so does
`SPARROW_PDL=1`, which launches every decode kernel so (`attention/kernels/pdl.py`). A PDL GEMM takes its shape's
PDL-less choice: PDL moves when its programs start, not how they stream the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparrow_sgl.engine import fused
from sparrow_sgl.engine.linear_table import cache_path, load_table, lookup, read_cache, remember, table_key

LINEAR_ENV = "SPARROW_LINEAR"
PDL_ENV = "SPARROW_LINEAR_PDL"
MODES = ("auto", "cublas", "triton")
MAX_M = 64  # triton_linear.MAX_M (not imported here: CPU-only installs have no triton)
FLUSH_BYTES = 128 * 2**20  # written between timed runs: more than the L2 of an H100/H200 (50 MB)
SLEEP_CYCLES = 200_000  # ~0.1 ms of GPU spin before each timed run, longer than a Python launch
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_CHOICES: dict[tuple, object] = {}  # choice key -> triton_linear.Config, or None for cuBLAS


def linear_mode() -> str:
    mode = os.environ.get(LINEAR_ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{LINEAR_ENV}={mode!r}: choose one of {MODES}")
    return mode


def use_pdl(device: torch.device) -> bool:
    """SPARROW_LINEAR_PDL=1 or SPARROW_PDL=1 on a GPU with programmatic dependent launch (sm_90+). Only the Triton
    path asks, so triton is there."""
    from sparrow_sgl.attention.kernels.pdl import pdl_env, pdl_supported

    return (os.environ.get(PDL_ENV, "").strip() == "1" or pdl_env()) and pdl_supported(device)


class Linear(nn.Linear):
    """nn.Linear with the small-M Triton GEMM on CUDA where chosen; `forward_silu_mul` fuses the MLP's SiLU x up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.triton_config(x)
        if config is None:
            return F.linear(x, self.weight, self.bias)
        from sparrow_sgl.attention.kernels.triton_linear import linear

        return linear(x, self.weight, self.bias, config, pdl=use_pdl(x.device))

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(SiLU(gate) * up) for gate_up [T, 2 in_features], in one Triton launch when that is chosen."""
        config = self.triton_config(gate_up, silu=True)
        if config is None:
            return self(fused.silu_mul(gate_up))
        from sparrow_sgl.attention.kernels.triton_linear import linear

        return linear(gate_up, self.weight, self.bias, config, silu_input=True, pdl=use_pdl(gate_up.device))

    def triton_config(self, x: torch.Tensor, silu: bool = False):
        """The Triton config for this call, or None for cuBLAS / F.linear."""
        mode = linear_mode()
        if mode == "cublas" or not self._triton_applies(x, silu):
            return None
        m, (n, k) = x.shape[0], self.weight.shape
        if mode == "triton":
            from sparrow_sgl.attention.kernels.triton_linear import default_config

            return default_config(m, n, k, x.device)
        # the last field (PDL) stays False: a PDL launch takes the PDL-less choice (module docstring)
        key = (x.device, 1 << (m - 1).bit_length(), n, k, x.dtype, self.bias is not None, silu, False)
        if key in _CHOICES:
            return _CHOICES[key]
        found, choice = shipped_choice(key)
        if not found:
            if _capturing(x):
                return None
            try:
                timings = time_choices(x, self.weight, self.bias, silu=silu)
                choice = min(timings, key=timings.get)
                remember_choice(key, choice)
            except Exception as e:  # noqa: BLE001 - e.g. no memory for the L2 flush: this shape stays on cuBLAS
                print(f"sparrow linear: timing {key} failed ({e}); using cuBLAS", file=sys.stderr)
                choice = None
        _CHOICES[key] = choice
        return choice

    def _triton_applies(self, x: torch.Tensor, silu: bool) -> bool:
        w, b = self.weight, self.bias
        return (
            x.is_cuda and _HAS_TRITON and x.dim() == 2
            and 0 < x.shape[0] <= MAX_M and x.shape[1] == (2 if silu else 1) * w.shape[1]
            and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and (b is None or b.dtype == x.dtype) and x.stride(1) == 1 and w.stride(1) == 1
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        )


def shipped_choice(key: tuple) -> tuple[bool, object]:
    """(found, Config or None) for a choice key from the measured table of this GPU, else from this machine's
    cache of earlier timings (`linear_table.py`)."""
    device, *shape = key
    if device.type != "cuda":
        return False, None
    gpu, shape_key = torch.cuda.get_device_name(device), table_key(*shape)
    found, choice = lookup(load_table(), gpu, shape_key)
    if not found:
        found, choice = lookup(read_cache(cache_path()), gpu, shape_key)
    if not found or choice is None:
        return found, None
    from sparrow_sgl.attention.kernels.triton_linear import Config

    return True, Config(*choice)


def remember_choice(key: tuple, choice) -> None:
    """Keep a timed choice (Config or None) in this machine's cache for later engines."""
    device, *shape = key
    if device.type == "cuda":
        as_tuple = None if choice is None else dataclasses.astuple(choice)
        remember(cache_path(), torch.cuda.get_device_name(device), table_key(*shape), as_tuple)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def time_choices(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, silu: bool = False,
    pdl: bool = False, reps: int = 10,
) -> dict:
    """Median microseconds of cuBLAS (key None; with silu: `fused.silu_mul` + F.linear) and of every Triton
    candidate that launches (key: its Config), each run from a cold L2, the candidates interleaved per rep."""
    from sparrow_sgl.attention.kernels import triton_linear

    n, k = weight.shape
    runs: dict[object, Callable[[], torch.Tensor]] = {
        None: lambda: F.linear(fused.silu_mul(x) if silu else x, weight, bias)}
    for config in triton_linear.candidates(x.shape[0], n, k, x.device):
        runs[config] = functools.partial(triton_linear.linear, x, weight, bias, config, silu_input=silu, pdl=pdl)
    for key, fn in list(runs.items()):
        try:
            fn()  # compiles; a config can exceed this GPU's shared memory
        except Exception as e:  # noqa: BLE001 - a config that cannot launch here is just not a candidate
            print(f"sparrow linear: {key} does not launch for {tuple(x.shape)} x {tuple(weight.shape)} ({e})",
                  file=sys.stderr)
            del runs[key]
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=x.device)
    events = {key: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                    for _ in range(reps)] for key in runs}
    for rep in range(reps):
        for key, fn in runs.items():
            flush.zero_()
            torch.cuda._sleep(SLEEP_CYCLES)  # the GPU waits on this, not on the host launching fn
            start, end = events[key][rep]
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize(x.device)
    return {key: statistics.median(s.elapsed_time(e) * 1e3 for s, e in pairs) for key, pairs in events.items()}


def chosen() -> dict[tuple, object]:
    """The cached auto choices: (device, M bucket, N, K, dtype, bias, silu, pdl) -> Config or None (cuBLAS)."""
    return dict(_CHOICES)
