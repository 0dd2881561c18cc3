"""`sparrow demo --quick` end to end: warm-up -> calibrate -> plan -> GRPO with sparse rollouts -> summary + plots."""

import json

import pytest

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
    assert 0.0 <= records[0]["rollout/solved_frac"] <= 1.0
    for key in ("reward_se", "greedy_exact", "greedy_exact_se", "prompts"):
        assert key in summary["reward_before"] and key in summary["reward_after"], key
    assert (out / "grpo_reward.png").is_file()
    assert "greedy exact before GRPO" in printed


def test_demo_refuses_cuda_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_summary_verdicts_explain_each_bin():
    from sparrow_sgl.demo import bin_verdict, measured_speedup_text
    from sparrow_sgl.plan import BinDecision
    from sparrow_sgl.tailguard import GuardEvent

    missing = BinDecision(0, 0, 128, 16, None, 0, "missing")
    assert bin_verdict(missing, None, 0.86, []) == (
        "no data", "no response reached this bin, its budget comes from a measured neighbour")
    fine = BinDecision(1, 128, 256, 16, 0.95, 40, "ok")
    assert bin_verdict(fine, 0.93, 0.86, [])[0] == "yes"
    dipped = BinDecision(2, 256, 384, 16, 0.95, 40, "ok")
    raised = [GuardEvent(step=1, bin=2, old=16, new=32, tail=0.78, reason="raise")]
    raised.append(GuardEvent(step=4, bin=2, old=32, new=16, tail=0.95, reason="lower"))
    verdict, note = bin_verdict(dipped, 0.78, 0.86, raised, 16)
    assert verdict == "NO" and "dipped to 0.78 < tau" in note
    assert "raised 16 tok -> 32 tok at step 1, lowered 32 tok -> 16 tok at step 4" in note
    assert note.endswith("after GRPO it decodes with 16 tok")
    assert "TailGuard off" in bin_verdict(dipped, 0.78, 0.86, None)[1]
    dense = BinDecision(3, 384, 512, None, 0.99, 40, "unsatisfiable")  # no budget held tau: planned dense
    assert bin_verdict(dense, 0.9998, 0.86, [])[0] == "yes (dense)"  # it was "NO" beside a live tail of 0.9998
    assert bin_verdict(dense, 0.8, 0.86, [])[0] == "NO"
    assert "not meaningful on CPU" in measured_speedup_text(8.72, "cpu")
    assert measured_speedup_text(2.1, "cuda") == "2.10x"


def test_plots_read_well_with_one_populated_bin(tmp_path):
    from sparrow_sgl.calibrate import CalibrationTable, plot_table
    from sparrow_sgl.mismatch import BinStat
    from sparrow_sgl.rl.metrics import bin_label, plot_run

    one_bin = {str(b): [BinStat(0, 128, 40, t, 0.99)] for b, t in ((16, 0.9), (32, 0.95), (64, 0.97))}
    table = CalibrationTable(bin_tokens=128, budgets={**one_bin, "dense": [BinStat(0, 128, 40, 1.0, 1.0)]})
    assert plot_table(table, tmp_path / "calib.png").stat().st_size > 0
    assert bin_label(1, 2048) == "tokens 2048-4096" and bin_label(1, None) == "bin 1"
    records = [{"step": s, "rollout/reward_mean": 0.1 * s, "sparse/tail_p5/bin_1": 0.9, "timing/step": 1.0}
               for s in (1, 2, 3)]
    paths = plot_run(records, tmp_path / "plots", tau=0.86, bin_tokens=2048)
    assert [p.name for p in paths] == ["reward.png", "tails.png", "timing.png"]


def _demo(tmp_path, **profile_changes):
    import argparse
    import copy

    from sparrow_sgl.demo import PROFILES, Demo

    profile = copy.deepcopy(PROFILES["pretrained"])
    for k, v in profile_changes.items():
        setattr(profile, k, v)
    args = argparse.Namespace(out=str(tmp_path), no_progress=True, seed=3, device="cpu", tailguard=True, tau=0.86)
    return Demo(profile, args, console=None)


def test_demo_profile_train_overrides_reach_the_trainer(tmp_path):
    import pytest

    from sparrow_sgl.config import ConfigError

    cfg = _demo(tmp_path, train={"temperature": 0.7, "clip_high": 0.3}).train_config(tmp_path / "model")
    assert cfg.temperature == 0.7 and cfg.clip_high == 0.3
    assert cfg.lr == 2e-4 and cfg.task_args["hops"] == 4 and cfg.task_args["seed"] == 4
    with pytest.raises(ConfigError, match="unknown key"):
        _demo(tmp_path, train={"no_such_key": 1}).train_config(tmp_path / "model")


def test_pretrained_profile_answers_fit_in_max_new_tokens():
    from transformers import AutoTokenizer

    from sparrow_sgl.demo import DEMO_MODEL, PROFILES
    from sparrow_sgl.rl.tasks import ChainTask

    p = PROFILES["pretrained"]
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    task = ChainTask(**p.task, seed=1)
    longest = max(len(tokenizer.encode(task.sample(i).reference, add_special_tokens=False)) for i in range(50))
    assert longest + 1 <= p.max_new_tokens  # + end of turn
    assert "<unk>" not in tokenizer.tokenize(task.sample(0).prompt)


def test_reward_plot_and_standard_error(tmp_path):
    from sparrow_sgl.demo import _se
    from sparrow_sgl.demo_plot import DemoRun, load_run, plot_demo_reward

    assert _se([0.0, 1.0]) == 0.5 and _se([1.0]) == 0.0
    records = [{"step": i + 1, "rollout/reward_mean": 0.5 + i / 40, "rollout/solved_frac": i / 20} for i in range(20)]
    before = {"reward_mean": 0.5, "reward_se": 0.02, "greedy_exact": 0.2, "greedy_exact_se": 0.04, "prompts": 64}
    after = {**before, "reward_mean": 0.9, "greedy_exact": 0.8}
    runs = [DemoRun("seed 0", records, before, after), DemoRun("seed 1", records[:10], before, after)]
    assert plot_demo_reward(runs, tmp_path / "r.png").stat().st_size > 0
    (tmp_path / "run" / "grpo").mkdir(parents=True)
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"seed": 2, "reward_before": before,
                                                               "reward_after": after}))
    (tmp_path / "run" / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = load_run(tmp_path / "run")
    assert run.label == "seed 2" and len(run.records) == 20 and run.after["greedy_exact"] == 0.8


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--tau", "2"], "--tau must lie in (0, 1), got 2.0"),
        (["--out", "afile"], "--out afile is a file; the demo writes a directory"),
    ],
)
def test_demo_settings_are_checked_before_the_model_is_built(tmp_path, monkeypatch, capsys, flags, expected):
    from sparrow_sgl import demo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me\n")
    monkeypatch.setattr(demo.Demo, "__init__", lambda *a: pytest.fail("the demo started before its flags were checked"))
    assert main(["demo", "--quick", "--out", "runs/demo", *flags]) == 2
    err = capsys.readouterr().err
    assert f"sparrow demo: error: {expected}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
