"""bench.decode_splits: bad settings are refused by name before any GPU work; on a GPU one tiny run prints a row
per split count, and forced split counts write the same attention (up to the merge's rounding)."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.parametrize("argv", [["--models", "qwen3-70b"], ["--entries", "0"], ["--splits", "0,2"],
                                  ["--live", "0"]])
def test_bad_settings_are_refused_by_name(argv, capsys):
    from bench.decode_splits import main

    with pytest.raises(SystemExit):
        main(argv)
    assert "--models from" in capsys.readouterr().err


@pytest.mark.gpu
def test_one_tiny_run_prints_a_row_per_split_count(capsys):
    from bench.decode_splits import main

    main(["--models", "qwen3-4b", "--entries", "48", "--splits", "1,3", "--live", "3"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    timed = [r for r in rows if "splits" in r]
    assert [(r["live"], r["splits"]) for r in timed] == [(25, 1), (25, 3), (3, 1), (3, 3)]
    assert all(r["us"] > 0 and r["planned"] >= 1 for r in timed)
    assert any("resources" in r for r in rows)


@pytest.mark.gpu
def test_forced_split_counts_attend_alike():
    from bench.decode_splits import problem
    from sparrow_sgl.attention.kernels.triton_decode import triton_attend_pages
    from sparrow_sgl.config import SparsityConfig

    p = problem("qwen3-4b", 40)
    k, v = p["caches"][:2]
    outs = [triton_attend_pages(p["q"], k, v, p["block_table"], p["seq_lens"], p["pages"], p["counts"],
                                SparsityConfig(page_size=16), splits=s).float() for s in (1, 2, 7)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        triton_attend_pages(p["q"], k, v, p["block_table"], p["seq_lens"], p["pages"], p["counts"],
                            SparsityConfig(page_size=16), splits=0)
