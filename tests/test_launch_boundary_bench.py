"""bench.launch_boundary: every variant reads the same bytes (the chain of launches, the persistent kernel with and
without the next-tile prefetch), and grids whose grid barrier could never complete are refused before a GPU is
touched. The barrier itself needs every program resident at once: GPU only (Triton's interpreter runs programs one
after another)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import interpret_only, needs_triton  # noqa: I001 - sets the interpreter flag before kernels import

pytestmark = needs_triton


@interpret_only
@pytest.mark.parametrize("prefetch", [False, True])
def test_the_persistent_kernel_reads_what_the_chain_reads(prefetch):
    import triton

    from bench import launch_boundary as lb

    block, unroll, n, phases, programs = 64, 2, 1000, 3, 5
    src = torch.randn(n * phases + 10, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    span = triton.cdiv(triton.cdiv(n, programs), block) * block
    chained = 0.0
    for p in range(phases):
        out = torch.zeros(programs * block)
        lb._phase_kernel[(programs,)](src[p * n :], out, n, span, BLOCK=block, UNROLL=unroll)
        chained += out.sum().item()
    out, bar = torch.zeros(programs * block), torch.zeros(2, dtype=torch.int32)
    lb._persistent_kernel[(programs,)](src, out, n, span, phases, bar, BARRIER=False, PREFETCH=prefetch,
                                       BLOCK=block, UNROLL=unroll)
    want = src[: n * phases].float().sum().item()
    assert out.sum().item() == pytest.approx(want, abs=1e-3) and chained == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--programs-per-sm", "4", "--tiles", "4096x4x8"], "warps per SM"),
    (["--total-mb", "5000"], "--total-mb must lie in"),
    (["--tiles", "2048x4"], "BLOCKxUNROLLxWARPS"),
])
def test_bad_settings_are_refused_by_name(argv, message):
    from bench.launch_boundary import main

    with pytest.raises(SystemExit, match=message):
        main(argv)
