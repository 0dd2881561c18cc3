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
