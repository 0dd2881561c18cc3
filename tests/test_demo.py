"""`sparrow demo --quick` end to end: warm-up -> calibrate -> plan -> GRPO with sparse rollouts -> summary + plots."""

import json

from sparrow_sgl.cli import main
from sparrow_sgl.config import Schedule
from sparrow_sgl.rl.metrics import read_jsonl


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "reward before GRPO" in printed and "per-bin 5th-percentile" in printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("reward_before", "reward_after", "bins", "speedup_predicted", "schedule", "times", "warmup"):
        assert key in summary, key
    assert summary["warmup"]["loss_last"] < summary["warmup"]["loss_first"]
    assert 0.0 <= summary["reward_before"]["reward_mean"] <= 1.0
    schedule = Schedule.from_dict(summary["schedule"])
    assert not schedule.is_dense  # the tiny model tolerates a sparse budget at tau
    assert summary["speedup_predicted"] >= 1.0
    for name in (
        "calibration.json",
        "calibration.png",
        "schedule.json",
        "grpo/plots/reward.png",
        "grpo/plots/tails.png",
    ):
        assert (out / name).is_file(), name
    records = read_jsonl(out / "grpo" / "metrics.jsonl")
    assert len(records) == summary["profile"]["grpo_steps"]
    # the warm-up teaches the answer format; partial credit (chain items restated in order) then scores > 0
    rewards = [r["rollout/reward_mean"] for r in records]
    rewards += [summary["reward_before"]["reward_mean"], summary["reward_after"]["reward_mean"]]
    assert any(r > 0 for r in rewards)
    assert all(r["sparse/kv_budget_mean"] < r["sparse/kv_context_mean"] for r in records)  # rollouts were sparse
    assert "sparse/noise_floor/tail_p5/min" in records[0]


def test_demo_refuses_cuda_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().out
