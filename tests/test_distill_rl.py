"""DistillSparse inside the embedded GRPO loop: `distill.enabled: true` runs a φ step after each θ step."""

from __future__ import annotations

import json

import pytest
import torch

from sparrow_sgl.rl.config import TrainConfig


def test_grpo_step_with_distill_trains_theta_and_phi_separately_and_replans(tiny_model_dir, tmp_path):
    trainer_module = pytest.importorskip("sparrow_sgl.rl.trainer")
    cfg = TrainConfig(
        model=str(tiny_model_dir), out_dir=str(tmp_path), steps=1, task="chain",
        task_args={"num_vars": 6, "hops": 2}, prompts_per_step=2, group_size=2, max_new_tokens=20,
        schedule="fixed:48", kv_gb=0.01, micro_batch_size=2, lr=1e-3, plot=False, progress=False, noise_floor=False,
        hardware="h100",
        distill={"enabled": True, "rank": 4, "lr": 1e-3, "replan_every": 1, "heldout_prompts": 2,
                 "replan_samples": 1, "replan_candidates": 1},
    )
    trainer = trainer_module.Trainer(cfg)
    lora_before = {k: v.clone() for k, v in trainer.distill.lora.adapter_state().items()}
    theta_before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    metrics = trainer.train_step()
    assert "distill/kl" in metrics and metrics["distill/kl"] >= 0
    lora_after = trainer.distill.lora.adapter_state()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_after)  # φ moved
    policy_params = list(trainer.policy.parameters())
    assert all(p.requires_grad and p.grad is not None for p in policy_params)  # the θ step still reached θ
    assert list(theta_before) == list(trainer.policy.state_dict())  # the policy stayed a plain model
    assert trainer.engine.adapter_path == str(trainer.distill.adapter_dir)
    events = [json.loads(line) for line in (tmp_path / "distill" / "replan.jsonl").read_text().splitlines()]
    assert events and events[-1]["step"] == 1 and "speedup_old" in events[-1]


def _distill_cfg(model_dir, out_dir, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir), out_dir=str(out_dir), steps=2, task="chain", task_args={"num_vars": 6, "hops": 2},
        prompts_per_step=2, group_size=2, max_new_tokens=12, schedule="fixed:48", kv_gb=0.01, micro_batch_size=2,
        lr=1e-3, plot=False, progress=False, noise_floor=False, hardware="h100",
        distill={"enabled": True, "rank": 4, "lr": 1e-3, "replan_every": 1, "heldout_prompts": 2,
                 "replan_samples": 1, "replan_candidates": 1},
    )
    return TrainConfig(**{**base, **kw})


def test_resume_restores_distill_lora_optimizer_and_replanner(tiny_model_dir, tmp_path):
    trainer_module = pytest.importorskip("sparrow_sgl.rl.trainer")
    straight = trainer_module.Trainer(_distill_cfg(tiny_model_dir, tmp_path / "a"))
    want = straight.train()[-1]
    first = trainer_module.Trainer(_distill_cfg(tiny_model_dir, tmp_path / "b", steps=1, save_every=1))
    first.train()
    saved = first.distill.state_dict()
    del first
    resumed = trainer_module.Trainer(_distill_cfg(tiny_model_dir, tmp_path / "b"))
    assert resumed.resume(tmp_path / "b") == 1
    now = resumed.distill.state_dict()
    assert all(torch.equal(saved["adapter"][k], now["adapter"][k]) for k in saved["adapter"])
    assert any(v.abs().sum() > 0 for k, v in now["adapter"].items() if "lora_B" in k)  # φ is not the fresh zero init
    moments = [s["exp_avg"] for s in now["optimizer"]["state"].values()]
    assert moments and all(torch.equal(a["exp_avg"], b) for a, b in zip(saved["optimizer"]["state"].values(), moments))
    assert now["replanner"]["events"] == saved["replanner"]["events"]
    assert resumed.engine.adapter_path == str(resumed.distill.adapter_dir)
    got = resumed.train()[-1]
    assert got["step"] == want["step"] == 2 and "distill/kl" in got
    skip = ("timing/", "rollout/tokens_per_s", "sparse/speedup_measured", "distill/seconds")
    for key, value in want.items():
        if not key.startswith(skip) and isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_resume_without_distill_state_starts_phi_at_zero(tiny_model_dir, tmp_path):
    trainer_module = pytest.importorskip("sparrow_sgl.rl.trainer")
    plain = trainer_module.Trainer(_distill_cfg(tiny_model_dir, tmp_path, steps=1, save_every=1, distill={}))
    plain.train()
    resumed = trainer_module.Trainer(_distill_cfg(tiny_model_dir, tmp_path))
    assert resumed.resume(tmp_path) == 1
    lora_b = [v for k, v in resumed.distill.state_dict()["adapter"].items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "resume" and events[-1]["distill_state"] is False
