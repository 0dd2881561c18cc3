import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from sparrow_sgl.calibrate import CalibrationTable
from sparrow_sgl.cli import main
from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.costmodel import AnalyticCost
from sparrow_sgl.mismatch import BinStat
from sparrow_sgl.plan import MISSING, OK, RAISED, UNSATISFIABLE, parse_lengths, plan_schedule

BIN = 2048


def make_table(tails: dict, counts: dict | None = None, **kw) -> CalibrationTable:
    """tails: {budget or None: [tail per bin]} (None in the list = empty bin)."""
    budgets = {}
    for budget, row in tails.items():
        stats = []
        for i, t in enumerate(row):
            n = 0 if t is None else (counts or {}).get((budget, i), 500)
            stats.append(BinStat(i * BIN, (i + 1) * BIN, n, t, None if t is None else min(1.0, t + 0.1)))
        budgets["dense" if budget is None else str(budget)] = stats
    return CalibrationTable(model="qwen3-4b", bin_tokens=BIN, budgets=budgets, **kw)


def test_picks_known_cheapest_budget_per_bin():
    table = make_table({
        512: [0.95, 0.85, 0.80, 0.70],
        1024: [0.97, 0.90, 0.87, 0.80],
        2048: [0.99, 0.95, 0.93, 0.88],
    })  # fmt: skip
    plan = plan_schedule(table, tau=0.86)
    assert plan.schedule.budgets == [512, 1024, 1024, 2048]
    assert [d.status for d in plan.bins] == [OK] * 4
    assert [d.tail for d in plan.bins] == [0.95, 0.90, 0.87, 0.88]
    # a margin asks for more headroom
    assert plan_schedule(table, tau=0.86, margin=0.02).schedule.budgets == [512, 1024, 2048, 2048]


def test_budgets_are_monotone_with_position():
    table = make_table({512: [0.80, 0.90, 0.70, 0.90], 1024: [0.90, 0.95, 0.75, 0.95], 2048: [0.95, 0.97, 0.90, 0.97]})
    plan = plan_schedule(table, tau=0.86)
    assert plan.schedule.budgets == [1024, 1024, 2048, 2048]
    assert [d.status for d in plan.bins] == [OK, RAISED, OK, RAISED]


def test_unsatisfiable_bin_goes_dense_and_is_reported():
    table = make_table({512: [0.90, 0.80, 0.90], 1024: [0.95, 0.84, 0.95]})
    plan = plan_schedule(table, tau=0.86)
    assert plan.schedule.budgets == [512, None, None]  # later bins stay dense: budgets never decrease
    assert plan.flagged(UNSATISFIABLE) == [1]
    assert "dense: no budget passes" in plan.report()


def test_bins_without_data_borrow_the_safer_neighbour_and_are_flagged():
    table = make_table(
        {512: [0.90, 0.95, 0.80, 0.80, None], 1024: [0.95, 0.96, 0.90, 0.88, None]},
        counts={(512, 1): 3, (1024, 1): 3},  # too few tokens to trust
    )
    plan = plan_schedule(table, tau=0.86, min_count=20)
    assert plan.schedule.budgets == [512, 1024, 1024, 1024, 1024]
    assert plan.flagged(MISSING) == [1, 4]
    # more bins than measured: the trailing ones take the last measured rule
    assert plan_schedule(table, tau=0.86, num_bins=7).schedule.budgets[-1] == 1024


@pytest.mark.parametrize("seed", range(6))
def test_plan_equals_brute_force_cheapest_monotone_schedule(seed):
    rng = np.random.default_rng(seed)
    grid, n_bins = [512, 1024, 2048], 4
    base = np.sort(rng.uniform(0.75, 0.99, size=(n_bins, len(grid))), axis=1)  # tails rise with the budget
    table = make_table({b: list(base[:, j]) for j, b in enumerate(grid)})
    cost = AnalyticCost("qwen3-4b", "h100")
    lengths = [n_bins * BIN - 100]

    def time_of(budgets):
        return cost.predict_rollout_time(Schedule(budgets=list(budgets), bin_tokens=BIN), lengths, batch=16)

    options = [*grid, None]
    best = None
    for combo in itertools.product(options, repeat=n_bins):
        key = [float("inf") if b is None else b for b in combo]
        if key != sorted(key):
            continue
        feasible = all(b is None or base[i, grid.index(b)] >= 0.86 for i, b in enumerate(combo))
        if feasible and (best is None or time_of(combo) < time_of(best)):
            best = combo
    assert plan_schedule(table, tau=0.86).schedule.budgets == list(best)


def test_warnings_for_noise_floor_and_topk_mode():
    table = make_table({512: [0.9, 0.9], None: [0.99, 0.85]}, mode="topk")
    plan = plan_schedule(table, tau=0.86)
    assert any("noise floor" in w and "bin 1" in w for w in plan.warnings)
    assert any("top-k" in w for w in plan.warnings)
    with pytest.raises(ConfigError, match="no sparse budgets"):
        plan_schedule(make_table({None: [0.99]}))


def test_parse_lengths(tmp_path):
    assert list(parse_lengths("4096")) == [4096]
    assert list(parse_lengths("1,2,3")) == [1, 2, 3]
    u = parse_lengths("uniform:1000:2000:11")
    assert u.size == 11 and u.min() == 1000 and u.max() == 2000
    f = tmp_path / "rollouts.jsonl"
    f.write_text(json.dumps({"token_ids": [1, 2, 3]}) + "\n" + json.dumps({"length": 7}) + "\n")
    assert list(parse_lengths(str(f))) == [3, 7]
    with pytest.raises(ConfigError, match="lengths"):
        parse_lengths("uniform:a:b")


def test_cli_plans_from_a_table_and_writes_a_schedule(tmp_path, capsys):
    table = make_table({512: [0.95, 0.85, 0.80], 1024: [0.97, 0.90, 0.87]})
    table.settings = {"page_size": 16, "scorer": "centroid", "dense_layers": [0, 1]}
    path = tmp_path / "calib.json"
    table.save(path)
    out = tmp_path / "sched.json"
    assert main(["plan", str(path), "--out", str(out), "--lengths", "6000", "--explain"]) == 0
    schedule = Schedule.load(out)
    assert schedule.budgets == [512, 1024, 1024] and schedule.tau == 0.86 and schedule.bin_tokens == BIN
    text = capsys.readouterr().out
    assert "predicted rollout speedup vs dense" in text and "0.9500" in text and "0.8700" in text


def test_cli_explains_a_paper_preset(capsys):
    assert main(["plan", "--preset", "qwen3-4b-0.86", "--explain", "--hardware", "h100"]) == 0
    text = capsys.readouterr().out
    assert "38000-40000" in text and "8192 (512p)" in text
    assert "predicted rollout speedup vs dense" in text and "bytes limit" in text
    assert main(["plan"]) == 2  # neither a table nor a preset: a clear error, no traceback


def test_cli_measured_prediction_follows_the_schedules_scorer(tmp_path, capsys):
    """`--measured` reads the sparse rows of the schedule's own scorer: the bf16-centroid copy of a preset, timed
    faster on the H200, predicts a larger speedup than the preset itself."""
    from sparrow_sgl.schedule import load_preset

    results = Path(__file__).resolve().parents[1] / "bench" / "results" / "decode_e2e.json"
    bf16 = tmp_path / "bf16.json"
    dataclasses.replace(load_preset("qwen3-4b-0.86"), scorer="centroid-bf16").save(bf16)

    def predicted(preset: str) -> float:
        assert main(["plan", "--preset", preset, "--measured", str(results), "--gpu", "H200", "--batch", "25",
                     "--lengths", "32768"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("predicted rollout speedup"))
        return float(line.split(":")[1].split("x")[0])

    assert predicted(str(bf16)) > predicted("qwen3-4b-0.86") > 1.0


def test_cli_drain_predicts_less_than_a_steady_batch(capsys):
    def predicted(*extra) -> float:
        assert main(["plan", "--preset", "qwen3-4b-0.86", "--lengths", "uniform:1024:32768", *extra]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if x.startswith("predicted rollout speedup"))
        return float(line.split(":")[1].split("x")[0])

    steady, drained = predicted(), predicted("--drain")
    assert 1.0 < drained < steady


def test_cli_plans_from_another_directory_with_a_relative_model_entry(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An older table (or a moved run dir) records the model relative to where calibrate ran: plan finds it."""
    import shutil

    run = tmp_path / "runs" / "demo"
    shutil.copytree(tiny_model_dir, run / "model")
    table = make_table({512: [0.95, 0.85, 0.80], 1024: [0.97, 0.90, 0.87]})
    table.model = "runs/demo/model"
    table.save(run / "calibration.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["plan", str(run / "calibration.json"), "--hardware", "cpu", "--lengths", "6000"]) == 0
    captured = capsys.readouterr()
    assert "unknown model" not in captured.err and "no speedup prediction" not in captured.err
    assert "predicted rollout speedup vs dense" in captured.out
    assert Schedule.load(run / "schedule-tau0.86.json").model == str((run / "model").resolve())


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--prompt-len", "-5"], "--prompt-len must be >= 0, got -5"),
        (["--hardware", "h999"], "unknown hardware 'h999'"),
        (["--model", "/nowhere"], "unknown model '/nowhere'"),
    ],
)
def test_cli_bad_cost_flags_fail_before_anything_is_printed_or_written(tmp_path, capsys, flags, expected):
    table = make_table({512: [0.95, 0.85], 1024: [0.97, 0.90]})
    path = tmp_path / "calib.json"
    table.save(path)
    out = tmp_path / "sched.json"
    assert main(["plan", str(path), "--out", str(out), "--explain", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith(f"sparrow plan: error: {expected}")
    assert not out.exists()


def test_cli_out_that_cannot_be_a_file_is_one_line_and_leaves_nothing(tmp_path, capsys):
    table = make_table({512: [0.95, 0.85], 1024: [0.97, 0.90]})
    path = tmp_path / "calib.json"
    table.save(path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep me\n")
    for out, expected in [("adir", "adir: is a directory, not a file"),
                          ("afile/sched.json", "afile: is a file, not a directory")]:
        assert main(["plan", str(path), "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and expected in err.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "calib.json"]  # no temporary files
    assert (tmp_path / "afile").read_text() == "keep me\n" and not any((tmp_path / "adir").iterdir())
