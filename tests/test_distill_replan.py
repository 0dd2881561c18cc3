"""Re-planning: cheaper candidates, switch / hold / revert decisions, the guard, and the standalone CLI."""

from __future__ import annotations

import json

import pytest
import torch

from distill.replan import Replanner, ReplanSettings, TrainedDenseView, cheaper_schedule
from sparrow_sgl.config import Schedule
from sparrow_sgl.mismatch import BinStat


def test_cheaper_schedule_scales_floors_and_keeps_dense_bins():
    s = Schedule(budgets=[None, 512, 1024, 4096], name="base")
    c = cheaper_schedule(s, 0.5)
    assert c.budgets == [None, 256, 512, 2048] and c.name == "basex0.5"
    assert cheaper_schedule(Schedule.fixed(64), 0.9).budgets == [48]  # floored to a page multiple
    assert cheaper_schedule(Schedule.fixed(48), 0.5) is None  # already at the sink + local minimum
    assert cheaper_schedule(Schedule.dense(), 0.5) is None
    with pytest.raises(ValueError, match="factor"):
        cheaper_schedule(s, 1.5)


class _FakeEngine:
    adapter_path = None


def _stats(tail: float, count: int = 100) -> list[BinStat]:
    return [BinStat(0, 2048, count, tail, tail + 0.1), BinStat(2048, 4096, 0, None, None)]


def _replanner(tmp_path, tails_by_budget: dict[int, float], **kw) -> Replanner:
    settings = ReplanSettings(tau=0.8, margin=0.02, candidates=2, factor=0.5, model="qwen3-4b",
                              max_new_tokens=8192, **kw)
    planner = Replanner(_FakeEngine(), [[1, 2, 3]], settings, log_path=str(tmp_path / "replan.jsonl"))
    planner.measure = lambda schedule: _stats(tails_by_budget[schedule.budgets[0]])
    return planner


def test_replan_switches_to_the_cheapest_candidate_that_holds_and_logs_speedups(tmp_path):
    planner = _replanner(tmp_path, {1024: 0.95, 512: 0.9, 256: 0.7})
    current = Schedule.fixed(1024)
    new, event = planner.replan(10, current)
    assert new is not None and new.budgets == [512]
    assert event.action == "switch" and event.old_budgets == [1024] and event.new_budgets == [512]
    assert event.speedup_new > event.speedup_old > 1.0
    assert set(event.tails.values()) == {0.95, 0.7, 0.9}
    logged = [json.loads(line) for line in (tmp_path / "replan.jsonl").read_text().splitlines()]
    assert logged[-1]["action"] == "switch" and logged[-1]["speedup_new"] == event.speedup_new
    assert "->" in event.summary() and "x" in event.summary()


def test_replan_holds_when_no_candidate_reaches_tau_plus_margin(tmp_path):
    planner = _replanner(tmp_path, {1024: 0.95, 512: 0.81, 256: 0.5})  # 0.81 < tau + margin = 0.82
    new, event = planner.replan(10, Schedule.fixed(1024))
    assert new is None and event.action == "hold" and event.new_budgets == [1024]


def test_replan_reverts_when_the_switched_schedule_fails_and_guard_raises_live(tmp_path):
    tails = {1024: 0.95, 512: 0.9, 256: 0.5, 128: 0.4}
    planner = _replanner(tmp_path, tails)
    switched, _ = planner.replan(10, Schedule.fixed(1024))
    raised = planner.observe(11, [BinStat(0, 2048, 100, 0.6, 0.9)])  # live tail below tau: the guard steps up
    assert raised is not None and raised.budgets[0] > 512
    tails[512] = 0.7  # the re-measure now says the switched schedule fails
    back, event = planner.replan(20, switched)
    assert event.action == "revert" and back.budgets == [1024]


def test_trained_dense_view_scores_dense_without_the_adapter(tiny_model_dir, tmp_path):
    from transformers import Qwen3ForCausalLM

    from distill.config import DistillConfig
    from distill.lora import RolloutLora
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine

    engine = Engine(EngineConfig(model=str(tiny_model_dir), num_kv_pages=64))
    lora = RolloutLora(Qwen3ForCausalLM.from_pretrained(tiny_model_dir), DistillConfig(rank=2))
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.05)
    prompts, responses = [[5, 6, 7, 8, 9] * 4], [[10, 11, 12] * 10]
    base_dense = engine.score(prompts, responses)[0].logprobs
    engine.set_adapter(str(lora.save(tmp_path / "a")))
    view = TrainedDenseView(engine)
    assert torch.equal(view.score(prompts, responses)[0].logprobs, base_dense)
    assert engine.adapter_path is not None  # switched back on after the dense score
    served = engine.score(prompts, responses, sparse=Schedule.fixed(48))[0].logprobs
    assert torch.equal(view.score(prompts, responses, sparse=Schedule.fixed(48))[0].logprobs, served)
    assert (served - base_dense).abs().max() > 1e-3


def test_cli_distills_and_reports_tails(tiny_model_dir, tmp_path, capsys):
    from sparrow_sgl.cli import main

    out = tmp_path / "adapter"
    code = main([
        "distill", "--model", str(tiny_model_dir), "--schedule", "fixed:48", "--steps", "2", "--out", str(out),
        "--task-args", '{"num_vars": 8, "hops": 2}', "--prompts-per-step", "2", "--samples", "2",
        "--max-new-tokens", "24", "--ignore-eos", "--eval-prompts", "2", "--eval-samples", "2", "--rank", "4",
        "--replan", "--tau", "0.5", "--kv-gb", "0.01",
    ])
    assert code == 0
    text = capsys.readouterr().out
    assert "lowest bin tail" in text and "replan step 2" in text
    assert (out / "adapter_config.json").is_file()
    events = [json.loads(line) for line in (out / "distill_log.jsonl").read_text().splitlines()]
    assert [e["when"] for e in events if e.get("event") == "tail"] == ["before", "after"]
    assert sum(e.get("event") == "step" for e in events) == 2
    assert any("action" in e for e in events)


def test_a_tail_that_fell_is_reported_with_what_to_try():
    import argparse

    from distill.cli import add_arguments, fell_warning

    assert fell_warning(0.98, 0.99, 1e-4) is None and fell_warning(None, 0.5, 1e-4) is None
    warning = fell_warning(0.9818, 0.6476, 1e-3)
    assert "0.9818 -> 0.6476" in warning and "--lr (now 0.001)" in warning
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model", "m", "--schedule", "dense", "--out", "o"]).lr == 1e-4  # was 1e-3
