"""bench.l2_prefetch: the stand-in decode read sums its whole buffer under either eviction policy (interpreter;
the prefetch and the spin are inline PTX, GPU only), bad settings are refused by name, and on a GPU one tiny
run prints a row per prefetch target."""

from __future__ import annotations

import json

import pytest
import torch
from triton_helpers import interpret_only, needs_triton  # noqa: I001 - sets the interpreter flag before kernels import

pytestmark = needs_triton


@interpret_only
@pytest.mark.parametrize("evict_first", [False, True])
def test_the_stream_kernel_reads_every_element(evict_first):
    from bench import l2_prefetch as lp

    n, block, programs = 1000, 64, 3
    src = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    span = 384  # ceil(n / programs) rounded up to whole blocks
    out = torch.zeros(programs)
    lp._stream_kernel[(programs,)](src, out, n, span, BLOCK=block, EVICT_FIRST=evict_first)
    assert out.sum().item() == pytest.approx(src.float().sum().item(), abs=1e-3)


@pytest.mark.parametrize("argv", [["--layers", "0"], ["--spin-us", "-1"]])
def test_bad_settings_are_refused_by_name(argv, capsys):
    from bench.l2_prefetch import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "--layers must be >= 1 and --spin-us >= 0" in capsys.readouterr().err


@pytest.mark.gpu
def test_one_tiny_run_prints_a_row_per_target(capsys):
    from bench.l2_prefetch import TARGETS, main

    main(["--models", "qwen3-1.7b", "--layers", "1", "--kv-mb", "0"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["target"] for r in rows] == list(TARGETS) and all(r["us_per_layer"] > 0 for r in rows)
