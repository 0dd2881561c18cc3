"""Schedule and SparsityConfig: JSON round-trip, presets, and each bad input's error message."""

from __future__ import annotations

import json

import pytest

from sparrow_sgl.config import ConfigError, Schedule, SparsityConfig
from sparrow_sgl.schedule import load_preset, preset_names, resolve_schedule


def test_round_trip(tmp_path):
    s = Schedule(budgets=[512, 1024, None], bin_tokens=2048, tau=0.9, dense_layers=[0], model="qwen3-4b")
    s.save(tmp_path / "s.json")
    loaded = Schedule.load(tmp_path / "s.json")
    assert loaded == s
    assert json.loads((tmp_path / "s.json").read_text())["budgets"] == [512, 1024, None]


def test_budget_at_is_a_step_function():
    s = Schedule(budgets=[512, 1024, 2048], bin_tokens=2000)
    assert [s.budget_at(p) for p in (0, 1999, 2000, 3999, 4000, 100_000)] == [512, 512, 1024, 1024, 2048, 2048]
    assert Schedule.dense().budget_at(10) is None
    assert Schedule.fixed(1024).budget_at(123456) == 1024


def test_presets_match_released_page_counts():
    assert "qwen3-4b-0.86" in preset_names()
    s = load_preset("qwen3-1.7b-0.86")
    assert s.bin_tokens == 2000 and s.page_size == 16 and s.dense_layers == [0, 1]
    assert s.budgets[0] == 512  # 29 pages + 1 sink + 2 local = 32 pages of 16 tokens
    assert s.budgets[-1] == 4096
    assert s.budgets == sorted(s.budgets)
    assert max(load_preset("qwen3-4b-0.86").budgets) == 8192
    assert s.tau == 0.86


def test_resolve_schedule_specs(tmp_path):
    assert resolve_schedule("dense").is_dense
    assert resolve_schedule("fixed:256").budgets == [256]
    assert resolve_schedule("qwen3-8b-0.86").name == "qwen3-8b-0.86"
    Schedule.fixed(64).save(tmp_path / "f.json")
    assert resolve_schedule(str(tmp_path / "f.json")).budgets == [64]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budgets=[100]), "not a multiple of the page size"),
        (dict(budgets=[16]), "below the 3 always-kept"),
        (dict(budgets=[]), "non-empty list"),
        (dict(budgets=[64], tau=1.2), "tau must lie in"),
        (dict(budgets=[64], tau=0.0), "tau must lie in"),
        (dict(budgets=[64], bin_tokens=0), "bin_tokens"),
        (dict(budgets=["64"]), "integer number of tokens"),
        (dict(budgets=[64], scorer="best"), "scorer must be"),
    ],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Schedule(**kwargs)


def test_bad_schedule_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Schedule.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Schedule.load(tmp_path / "bad.json")
    (tmp_path / "unknown.json").write_text(json.dumps({"budgets": [64], "bugdet": 3}))
    with pytest.raises(ConfigError, match="unknown key"):
        Schedule.load(tmp_path / "unknown.json")
    (tmp_path / "nobudgets.json").write_text(json.dumps({"page_size": 16}))
    with pytest.raises(ConfigError, match="missing required key 'budgets'"):
        Schedule.load(tmp_path / "nobudgets.json")


def test_bad_specs():
    with pytest.raises(ConfigError, match="unknown schedule"):
        resolve_schedule("qwen3-99b-0.86")
    with pytest.raises(ConfigError, match="integer token budget"):
        resolve_schedule("fixed:lots")
    with pytest.raises(ConfigError, match="unknown schedule preset"):
        load_preset("nope")


def test_sparsity_config_validation():
    assert SparsityConfig().min_budget == 48
    with pytest.raises(ConfigError, match="page_size"):
        SparsityConfig(page_size=0)
    with pytest.raises(ConfigError, match="kv_layout"):
        SparsityConfig(kv_layout="XYZ")
    with pytest.raises(ConfigError, match="local_pages"):
        SparsityConfig(local_pages=0)
