"""bench.gemm_small_m's choice among timed configs: `auto`, Triton only, and `auto-old` (the tiles before session 8)."""

from __future__ import annotations

from triton_helpers import needs_triton

from bench import gemm_small_m as bench


@needs_triton
def test_best_picks_the_fastest_in_each_settings_pool():
    from sparrow_sgl.attention.kernels.triton_linear import TILES, Config

    old, new = TILES[0], TILES[bench.OLD_TILES]
    old_config, new_config = Config(old[0], old[1], 2, old[2], old[3]), Config(new[0], new[1], 2, new[2], new[3])
    timings = {None: 10.0, old_config: 12.0, new_config: 8.0}
    assert bench.best(timings, triton_only=False) == new_config  # auto: the new tile wins
    assert bench.best(timings, triton_only=False, old_tiles=True) is None  # auto-old: cuBLAS beats the old tile
    assert bench.best(timings, triton_only=True, old_tiles=True) == old_config
    assert bench.best({None: 10.0}, triton_only=True) is None  # no Triton config launched: cuBLAS
