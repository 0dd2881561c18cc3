"""The rollout-only LoRA: invisible to the dense policy, gradients kept apart, peft round trip through the engine."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3ForCausalLM

from distill.config import DistillConfig
from distill.lora import RolloutLora
from distill.sparse_forward import response_logprobs
from sparrow_sgl.config import EngineConfig, Schedule
from sparrow_sgl.engine import Engine, SamplingParams
from sparrow_sgl.rl.batch import RolloutBatch
from sparrow_sgl.rl.config import TrainConfig
from sparrow_sgl.rl.recompute import recompute_old, token_logprobs

TOL_ENGINE = 1e-5  # sparse log-probs of θ + φ: our teacher-forced forward vs the engine serving the merged adapter
SCHEDULE = Schedule(budgets=[None, 48, 64], bin_tokens=32)



def _policy(model_dir):
    return Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()


def _randomize(lora: RolloutLora, scale: float = 0.05, seed: int = 0) -> None:
    """peft starts B at 0 (φ = identity); give φ a visible effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _trajectories(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (30, 21)]
    responses = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (50, 64)]
    return prompts, responses


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(EngineConfig(model=str(tiny_model_dir), num_kv_pages=256))


def test_dense_policy_is_bit_identical_with_and_without_the_adapter(tiny_model_dir):
    policy = _policy(tiny_model_dir)
    x = torch.randint(0, policy.config.vocab_size, (2, 50))
    mask = torch.ones_like(x, dtype=torch.bool)
    before = token_logprobs(policy, x, mask).logprobs.detach()
    names = list(policy.state_dict())
    lora = RolloutLora(policy, DistillConfig(rank=4, alpha=8))
    _randomize(lora)
    after = token_logprobs(policy, x, mask).logprobs.detach()
    assert torch.equal(before, after)
    assert list(policy.state_dict()) == names  # the engine's update_weights and checkpoints see the plain model
    with_lora = token_logprobs(lora.model, x, mask).logprobs.detach()
    assert (with_lora - before).abs().max() > 1e-3  # φ is live in the rollout model
    with lora.model.disable_adapter():
        assert torch.equal(token_logprobs(lora.model, x, mask).logprobs.detach(), before)
    shared = lora.model.get_base_model().model.layers[0].mlp.up_proj
    assert shared.base_layer.weight is policy.model.layers[0].mlp.up_proj.weight  # θ is shared, not copied


def test_gradients_reach_only_phi_in_distill_and_only_theta_in_policy_step(tiny_model_dir):
    policy = _policy(tiny_model_dir)
    lora = RolloutLora(policy, DistillConfig(rank=4))
    _randomize(lora)
    prompts, responses = _trajectories(policy.config.vocab_size)
    with lora.frozen_base():
        logprobs, mask, _ = response_logprobs(lora.model, prompts, responses, SCHEDULE)
        logprobs[mask].sum().backward()
    assert all(p.grad is None for p in policy.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
    assert all(p.requires_grad for p in policy.parameters())  # θ is trainable again afterwards
    for p in lora.parameters():
        p.grad = None
    x = torch.randint(0, policy.config.vocab_size, (2, 40))
    token_logprobs(policy, x, torch.ones_like(x, dtype=torch.bool)).logprobs.sum().backward()
    assert all(p.grad is None for p in lora.parameters())
    assert all(p.grad is not None for p in policy.parameters())


def test_adapter_round_trip_through_engine_and_peft(tiny_model_dir, engine, tmp_path):
    policy = _policy(tiny_model_dir)
    lora = RolloutLora(policy, DistillConfig(rank=4, alpha=8))
    _randomize(lora, seed=1)
    prompts, responses = _trajectories(policy.config.vocab_size, seed=1)
    with torch.no_grad():
        ours, mask, _ = response_logprobs(lora.model, prompts, responses, SCHEDULE)
        base, _, _ = response_logprobs(policy, prompts, responses, SCHEDULE)
    path = lora.save(tmp_path / "adapter")
    engine.set_adapter(str(path))
    try:
        served = engine.score(prompts, responses, sparse=SCHEDULE)
    finally:
        engine.set_adapter(None)
    restored = engine.score(prompts, responses, sparse=SCHEDULE)
    for b, (s, r) in enumerate(zip(served, restored)):
        n = len(s.logprobs)
        torch.testing.assert_close(s.logprobs, ours[b, :n], atol=TOL_ENGINE, rtol=0)
        torch.testing.assert_close(r.logprobs, base[b, :n], atol=TOL_ENGINE, rtol=0)
    assert (ours - base)[mask].abs().max() > 1e-3

    fresh = RolloutLora(_policy(tiny_model_dir), DistillConfig(rank=4, alpha=8))
    fresh.load(path)
    with torch.no_grad():
        again, _, _ = response_logprobs(fresh.model, prompts, responses, SCHEDULE)
    assert torch.equal(again, ours)

    merged = Engine(EngineConfig(model=str(lora.save_merged(tmp_path / "merged", engine.tokenizer)), num_kv_pages=64))
    for b, s in enumerate(merged.score(prompts, responses, sparse=SCHEDULE)):
        torch.testing.assert_close(s.logprobs, ours[b, : len(s.logprobs)], atol=TOL_ENGINE, rtol=0)


def test_distill_step_moves_only_phi_pushes_it_and_shrinks_the_kl(tiny_model_dir, engine, tmp_path):
    from distill.trainer import DistillTrainer

    policy = _policy(tiny_model_dir)
    train_cfg = TrainConfig(model=str(tiny_model_dir), out_dir=str(tmp_path), micro_batch_size=2, temperature=1.0,
                            prompts_per_step=2, group_size=2)
    cfg = DistillConfig(enabled=True, rank=4, lr=1e-3, kl_coef=1.0, ppo_coef=0.0, replan_every=0)
    trainer = DistillTrainer(cfg, train_cfg, policy, engine, engine.tokenizer)
    _randomize(trainer.lora, scale=0.03)  # start φ away from the dense policy so there is a KL to shrink
    prompts, _ = _trajectories(policy.config.vocab_size, seed=2)
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=60, n=2, seed=0, ignore_eos=True),
                               schedule=SCHEDULE, progress=False)
    batch = RolloutBatch.from_rollouts(rollouts, [0.0] * 4, [0.0] * 4)
    old = recompute_old(policy, batch, micro_batch_size=4).logprobs
    theta = {k: v.clone() for k, v in policy.state_dict().items()}
    try:
        kls = [trainer.step(batch, old, step=i + 1, schedule=SCHEDULE)["distill/kl"] for i in range(4)]
        assert engine.adapter_path == str(trainer.adapter_dir)
    finally:
        engine.set_adapter(None)
    assert all(torch.equal(theta[k], v) for k, v in policy.state_dict().items())
    assert kls[-1] < 0.5 * kls[0], kls
    with pytest.raises(ValueError, match="kl_mode"):
        trainer.step(batch, old[..., None].expand(-1, -1, 3), step=5)
