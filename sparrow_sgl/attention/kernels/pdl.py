"""Programmatic dependent launch (PDL, sm_90+) for the decode step's Triton kernels: `SPARROW_PDL=1`.

A decode step is ~470 short launches (14 per layer); between two of them the GPU drains one grid, then launches and
ramps up the next. A kernel launched with PDL may become resident while the kernel before it in the stream still
runs: each of its programs first waits (`griddepcontrol.wait`: the previous grid complete, its writes visible), then
lets its own dependents launch (`griddepcontrol.launch_dependents`). So the next grid is scheduled during this one's
last wave and starts the moment it ends; the small-M GEMM also loads its first weight tile before the wait.

The trigger comes after the wait, never before: a kernel that triggered at once would let its dependent trigger
too, and the whole step's grids would pile up resident and waiting (the GEMM-only PDL of phase 6 did that and was
13% slower). Every program waits, early-exit ones included, so a kernel never completes before its predecessor and
whatever ran two launches back is complete as well. Kernels of other libraries in the stream (cuBLAS, torch,
FlashInfer) are launched without PDL and serialise as usual.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

PDL_ENV = "SPARROW_PDL"


def pdl_env() -> bool:
    """`SPARROW_PDL` (0 or 1; default 0), read when a launch is built or captured."""
    text = os.environ.get(PDL_ENV, "").strip() or "0"
    if text not in ("0", "1"):
        raise ValueError(f"{PDL_ENV}={text!r}: choose 1 (programmatic dependent launch) or 0")
    return text == "1"


def pdl_supported(device: torch.device) -> bool:
    return device.type == "cuda" and gdc_wait is not None and torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_on(device: torch.device) -> bool:
    """Whether this device's decode kernels launch with PDL: `SPARROW_PDL=1` on an sm_90+ GPU."""
    return pdl_env() and pdl_supported(device)


def launch_options(pdl: bool) -> dict:
    """Extra keyword arguments of a Triton launch."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of a PDL-capable kernel: wait for the previous grid, then release the next."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
