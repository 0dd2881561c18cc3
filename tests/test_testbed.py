"""`sparrow testbed` at toy size on CPU: pretrain -> sweep (calibrate, plan, speed, GRPO runs in-process) -> report."""

import json

import pytest

from sparrow_sgl.cli import main
from sparrow_sgl.errors import ConfigError
from sparrow_sgl.testbed import PRETRAIN_PROFILES, SWEEP_TASKS, pick_sweep_task, sweep_task_settings
from sparrow_sgl.testbed_report import ACC_DROP, REWARD_CRASH, WINDOW, best_window, markdown, row_for


def test_toy_pretrain_sweep_report(tmp_path):
    model, sweep, results = tmp_path / "model", tmp_path / "sweep", tmp_path / "results"
    assert main(["testbed", "pretrain", "--profile", "toy", "--out", str(model), "--no-progress"]) == 0
    info = json.loads((model / "pretrain.json").read_text())
    assert info["steps"] == 4 and "acc/toy" in info["final_eval"] and "testbed pretrain" in info["command"]
    config = json.loads((model / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and (model / "tokenizer.json").is_file()
    assert main(["testbed", "sweep", "--profile", "toy", "--model", str(model), "--out", str(sweep),
                 "--results", str(results), "--no-progress"]) == 0
    for tau in ("0.75", "0.80", "0.86", "0.92"):
        assert (sweep / f"schedule_{tau}.json").is_file()
    speed = json.loads((sweep / "speed.json").read_text())
    assert set(speed["rows"]) == {"dense", "0.75", "0.80", "0.86", "0.92"}
    names = {"dense", "tau-0.75", "tau-0.80", "tau-0.86", "tau-0.92", "tau-0.80+distill"}
    for name in names:
        records = [json.loads(x) for x in (sweep / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 2
        for key in ("rollout/reward_mean", "rollout/response_length_mean", "sparse/is_truncated_frac",
                    "rollout/tokens_per_s", "sparse/tail_p5/min"):
            assert key in records[-1], (name, key)
        evals = [json.loads(x) for x in (sweep / "runs" / name / "evals.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [0, 1, 2]
    assert any(k.startswith("distill/") for k in records[-1]) or name != "tau-0.80+distill"
    rows = json.loads((results / "table.json").read_text())
    assert {r["config"] for r in rows} == names
    assert (results / "sweep.png").is_file() and "collapsed" in (results / "table.md").read_text()
    assert main(["testbed", "seeds", "--sweep", str(sweep), "--sweep", str(sweep), "--out", str(results)]) == 0
    assert "| dense |" in (results / "seeds.md").read_text() and (results / "seeds.png").is_file()
    # a second sweep reusing these plans, with a flat-budget run below tau and DistillSparse on it
    again = tmp_path / "again"
    assert main(["testbed", "sweep", "--profile", "toy", "--model", str(model), "--out", str(again),
                 "--set", f"plans_from={sweep}", "--set", "targets=[0.80]", "--set", "fixed_budgets=[12]",
                 "--set", "distill_schedule=fixed:12", "--no-progress"]) == 0
    rows = json.loads((again / "report" / "table.json").read_text())
    assert {r["config"] for r in rows} == {"dense", "tau-0.80", "fixed-12", "fixed-12+distill"}
    assert (again / "calibration.json").is_file() and (again / "schedule_0.80.json").is_file()
    guard = tmp_path / "guard"  # only the TailGuard run of a reused plan
    assert main(["testbed", "sweep", "--profile", "toy", "--model", str(model), "--out", str(guard),
                 "--set", f"plans_from={sweep}", "--set", "targets=[0.80]", "--set", "guard_targets=[0.80]",
                 "--set", "only=[tau-0.80+guard]", "--no-progress"]) == 0
    spec = json.loads((guard / "runs" / "spec_tau-0.80+guard.json").read_text())
    assert spec["train"]["tailguard"] and spec["train"]["tau"] == 0.8
    assert [p.name for p in (guard / "runs").glob("spec_*.json")] == ["spec_tau-0.80+guard.json"]
    assert main(["testbed", "sweep", "--profile", "toy", "--model", str(model), "--out", str(tmp_path / "bad"),
                 "--set", f"plans_from={sweep}", "--set", "only=[tau-0.5]", "--no-progress"]) != 0
    assert not (tmp_path / "bad" / "runs").exists()


def test_collapse_rule():
    def run(rewards, accs):
        return {"metrics": [{"rollout/reward_mean": r} for r in rewards],
                "evals": [{"step": s, "greedy_exact": a} for s, a in accs], "summary": {"steps": len(rewards)}}

    dense = run([0.5] * 20, [(0, 0.5), (20, 0.6)])
    ok = row_for("tau-0.86", run([0.5] * 20, [(0, 0.5), (20, 0.55)]), dense, {}, 20, 20)
    assert not ok["collapsed"] and ok["reward_vs_dense"] == 1.0
    worse = row_for("tau-0.75", run([0.5] * 20, [(0, 0.5), (20, 0.5 - ACC_DROP - 0.01)]), dense, {}, 20, 20)
    assert worse["collapsed"] and worse["collapse_reasons"][0].startswith("(a)")
    crash = row_for("tau-0.80", run([0.6] * 10 + [0.6 * REWARD_CRASH - 0.01] * 10, [(0, 0.5), (20, 0.6)]),
                    dense, {}, 20, 20)
    assert crash["collapsed"] and crash["collapse_reasons"] == [f"(c) reward {0.6 * REWARD_CRASH - 0.01:.3f} vs "
                                                                f"best {0.6:.3f}"]
    assert best_window([1.0] * WINDOW + [0.0]) == 1.0
    assert "| tau-0.86 | 0.86 |" in markdown([ok])


def test_committed_demo_checkpoint():
    """The demo's pretrained checkpoint: bf16 safetensors <= 16 MB, tokenizer, and the command + seed that made it."""
    from transformers import AutoConfig, AutoTokenizer

    from sparrow_sgl.demo import DEMO_MODEL, PROFILES
    from sparrow_sgl.rl.tasks import ChainTask

    assert (DEMO_MODEL / "model.safetensors").stat().st_size <= 16 * 2**20
    assert AutoConfig.from_pretrained(DEMO_MODEL).dtype in ("bfloat16", __import__("torch").bfloat16)
    info = json.loads((DEMO_MODEL / "pretrain.json").read_text())
    assert info["command"].startswith("sparrow testbed pretrain") and info["seed"] == 0
    assert (DEMO_MODEL / "PROVENANCE.md").is_file()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    sample = ChainTask(**PROFILES["pretrained"].task, seed=1).sample(0)
    ids = tokenizer.encode(sample.reference, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == sample.reference
    assert PROFILES["pretrained"].pretrained and not PROFILES["cpu"].pretrained


def test_sweep_task_pick_rule(tmp_path):
    """The sweep runs the longest candidate task the pretrained model solves (rule fixed before the sweep)."""
    assert pick_sweep_task({"acc/long": 0.1, "acc/mid": 0.3, "acc/short": 0.9}) == "mid"
    assert pick_sweep_task({}) == "minimal"
    p = tmp_path / "pretrain.json"
    p.write_text(json.dumps({"final_eval": {"acc/long": 0.5}}))
    assert sweep_task_settings(f"auto={p}")["task"] == SWEEP_TASKS["long"][0]
    assert sweep_task_settings("minimal")["page_size"] == 4
    for _, settings in SWEEP_TASKS.values():  # every budget keeps the 3 sink + local pages
        assert min(settings.get("budgets", [48])) >= 3 * settings.get("page_size", 16)
    with pytest.raises(ConfigError, match="not one of"):
        sweep_task_settings("huge")
    with pytest.raises(ConfigError, match="pretraining record not found"):
        sweep_task_settings(f"auto={tmp_path}/none.json")
    (tmp_path / "other.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(ConfigError, match="has no final_eval"):
        sweep_task_settings(f"auto={tmp_path}/other.json")
    assert set(PRETRAIN_PROFILES["h200-lengths"]["eval_tasks"]) == set(SWEEP_TASKS)
