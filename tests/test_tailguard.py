import json

import numpy as np
import pytest

from sparrow_sgl.calibrate import CalibrationTable
from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.mismatch import BinStat
from sparrow_sgl.tailguard import LOWER, MONOTONE, RAISE, TailGuard

GRID = [512, 768, 1024, 1536, 2048, 3072]
TAU = 0.86


def guard(budgets, **kw) -> TailGuard:
    kw.setdefault("grid", GRID)
    return TailGuard(Schedule(budgets=list(budgets), bin_tokens=2048, tau=TAU), **kw)


def test_raises_a_bin_whose_tail_dips_below_tau():
    g = guard([512, 1024, 2048])
    events = g.update(1, [0.90, 0.80, 0.90])
    assert [(e.bin, e.old, e.new, e.reason) for e in events] == [(1, 1024, 1536, RAISE)]
    assert events[0].tail == 0.80 and events[0].step == 1
    assert g.schedule.budgets == [512, 1536, 2048]
    assert g.schedule.bin_tokens == 2048 and g.schedule.tau == TAU


def test_raise_keeps_budgets_monotone():
    g = guard([512, 512, 1024])
    events = g.update(3, [0.80, 0.90, 0.90])
    assert [(e.bin, e.new, e.reason) for e in events] == [(0, 768, RAISE), (1, 768, MONOTONE)]
    assert g.schedule.budgets == [768, 768, 1024]
    # a dip in a bin lifted this very step starts from the budget it was measured at, not from the lifted one
    g = guard([512, 512, 1024])
    g.update(4, [0.80, 0.80, 0.90])
    assert g.schedule.budgets == [768, 768, 1024]


def test_top_of_grid_goes_dense_and_never_above():
    g = guard([3072])
    assert g.update(1, [0.5])[0].new is None
    assert g.schedule.budgets == [None]
    assert g.update(2, [0.5]) == []  # dense is the ceiling
    assert g.schedule.is_dense


def test_lowers_after_sustained_headroom_only():
    g = guard([512, 2048], patience=3, headroom=0.03)
    for step in range(2):
        assert g.update(step, [0.87, 0.95]) == []
    events = g.update(2, [0.87, 0.95])
    assert [(e.bin, e.old, e.new, e.reason) for e in events] == [(1, 2048, 1536, LOWER)]
    assert g.schedule.budgets == [512, 1536]  # bin 0 sits inside the band [tau, tau + headroom): held
    for step in range(3, 5):
        g.update(step, [0.87, 0.95])
    g.update(5, [0.87, 0.88])  # back inside the band: the streak starts over
    g.update(6, [0.87, 0.95])
    assert [e for e in g.events if e.step >= 3] == []
    # lowering stops at the previous bin's budget
    g = guard([1024, 1536], patience=1)
    assert [(e.bin, e.new) for e in g.update(0, [0.87, 0.99])] == [(1, 1024)]
    assert g.update(1, [0.87, 0.99]) == [] and g.schedule.budgets == [1024, 1024]


@pytest.mark.parametrize("seed", range(3))
def test_never_oscillates_on_noise_inside_the_hysteresis_band(seed):
    rng = np.random.default_rng(seed)
    g = guard([512, 1024, 1536, 2048], patience=2, headroom=0.03)
    for step in range(300):
        g.update(step, list(rng.uniform(TAU, TAU + 0.03 - 1e-9, size=4)))
    assert g.events == [] and g.schedule.budgets == [512, 1024, 1536, 2048]
    # noise that crosses the upper edge now and then never builds the streak a lower needs
    g = guard([512, 1024], patience=4, headroom=0.03)
    for step in range(300):
        above = step % 4 == 3  # every 4th measurement has headroom, the others sit inside the band
        g.update(step, [TAU + (0.05 if above else 0.01)] * 2)
    assert g.events == []


def test_a_failed_lower_is_reverted_and_the_bin_waits_longer():
    g = guard([1024], patience=2, backoff=2.0)
    g.update(0, [0.95])
    assert [e.reason for e in g.update(1, [0.95])] == [LOWER] and g.schedule.budgets == [768]
    assert [e.reason for e in g.update(2, [0.80])] == [RAISE] and g.schedule.budgets == [1024]
    for step in range(3, 6):  # patience is now 4
        assert g.update(step, [0.95]) == []
    assert [e.reason for e in g.update(6, [0.95])] == [LOWER]


def test_simulated_training_converges_to_a_stable_safe_schedule():
    # true tail falls with position and rises with budget; measurements carry noise of +-0.005
    def true_tail(budget, i):
        return 1.0 if budget is None else 1.0 - 0.045 * (i + 1) * 1024 / budget

    rng = np.random.default_rng(0)
    g = guard([512] * 6, patience=3, headroom=0.03)
    for step in range(400):
        g.update(step, [true_tail(b, i) + rng.uniform(-0.005, 0.005) for i, b in enumerate(g.budgets)])
    late = [e for e in g.events if e.step >= 200]
    assert late == [], late
    assert all(true_tail(b, i) >= TAU - 0.005 for i, b in enumerate(g.budgets))
    assert g.budgets == sorted(g.budgets)


def test_calibration_table_says_how_far_to_raise():
    stats = lambda tails: [BinStat(i * 2048, (i + 1) * 2048, 100, t, t) for i, t in enumerate(tails)]
    table = CalibrationTable(budgets={"1024": stats([0.9, 0.8]), "1536": stats([0.95, 0.84]), "3072": stats([1, 0.9])})
    g = guard([1024, 1024], calibration=table)
    events = g.update(0, [0.90, 0.80])
    assert (events[0].bin, events[0].new) == (1, 3072)


def test_binstat_input_min_count_and_bins_beyond_the_schedule():
    g = guard([512, 1024], min_count=20)
    tails = [BinStat(0, 2048, 5, 0.1, 0.9), BinStat(2048, 4096, 100, 0.9, 0.99), BinStat(4096, 6144, 100, 0.5, 0.9)]
    events = g.update(0, tails)
    assert [(e.bin, e.new) for e in events] == [(2, 1536)]  # bin 0 has too few tokens to act on
    assert g.schedule.budgets == [512, 1024, 1536]
    assert g.update(1, {5: 0.5})[0].bin == 5 and len(g.schedule.budgets) == 6
    with pytest.raises(ConfigError, match="bins"):
        g.update(2, [BinStat(0, 1000, 100, 0.5, 0.9)])
    with pytest.raises(ConfigError, match="multiples"):
        guard([512], grid=[500])


def test_state_dict_round_trip_continues_identically():
    a = guard([512, 1024], patience=2)
    for step, tails in enumerate([[0.95, 0.80], [0.95, 0.95], [0.95, 0.95]]):
        a.update(step, tails)
    state = json.loads(json.dumps(a.state_dict()))
    b = guard([512, 1024], patience=2)
    b.load_state_dict(state)
    assert b.schedule.budgets == a.schedule.budgets and b.events == a.events
    for step in range(3, 8):
        tails = [0.95, 0.97]
        assert a.update(step, tails) == b.update(step, tails)
    assert a.state_dict() == b.state_dict()
