"""The tail measured inside OpenRLHF (tails.py, on an Experience-shaped batch) equals the embedded trainer's
(rl/recompute.py + rl/metrics.py) on the same rollouts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("openrlhf")

from sparrow_sgl.openrlhf.tails import experience_alpha, tail_logs  # noqa: E402

pytestmark = pytest.mark.openrlhf
TEMPERATURE, TOPK, BIN = 0.8, 4, 16


def test_tails_equal_the_embedded_trainers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine, SamplingParams
    from sparrow_sgl.rl.batch import RolloutBatch
    from sparrow_sgl.rl.metrics import tail_metrics
    from sparrow_sgl.rl.recompute import recompute_old

    engine = Engine(EngineConfig(model=str(tiny_model_dir), num_kv_pages=256))
    prompts = [list(range(5, 5 + n)) for n in (20, 33, 41)]
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=40, n=2, seed=7, logprobs_topk=TOPK)
    rollouts = engine.generate(prompts, params, "fixed:48", progress=False)  # sparse: alpha < 1 somewhere
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    # the embedded trainer
    batch = RolloutBatch.from_rollouts(rollouts, torch.zeros(len(rollouts)), torch.zeros(len(rollouts)), pad_id=0,
                                       with_topk=True)
    old = recompute_old(policy, batch, micro_batch_size=2, temperature=TEMPERATURE, topk=True)
    expected, _ = tail_metrics(old.alpha, batch.positions, batch.response_mask, BIN, 0.05)

    # inside OpenRLHF: one right-padded Experience, action column j = token j + 1, logits / temperature
    width = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    sequences = torch.zeros(len(rollouts), width, dtype=torch.long)
    attention = torch.zeros_like(sequences)
    action_mask = torch.zeros(len(rollouts), width - 1, dtype=torch.long)
    for i, r in enumerate(rollouts):
        ids = r.prompt_ids + r.token_ids
        sequences[i, : len(ids)], attention[i, : len(ids)] = torch.tensor(ids), 1
        action_mask[i, len(r.prompt_ids) - 1 : len(ids) - 1] = 1
    with torch.no_grad():
        logits = policy(input_ids=sequences, attention_mask=attention).logits.float() / TEMPERATURE
    pairs = experience_alpha(logits, action_mask, [[r.topk_ids, r.topk_logprobs] for r in rollouts])
    logs, stats = tail_logs([a for a, _ in pairs], [p for _, p in pairs], BIN, 0.05, tau=0.86)

    bins = {k.rsplit("_", 1)[1]: v for k, v in expected.items() if "/bin_" in k}
    assert len(bins) >= 3 and min(bins.values()) < 0.999  # several bins, and the sparse rollout left a mark
    for i, value in bins.items():
        assert logs[f"sparrow/tail_bin_{i}"] == pytest.approx(value, abs=1e-5)
    assert logs["sparrow/tail_min"] == pytest.approx(expected["sparse/tail_p5/min"], abs=1e-5)
    assert logs["sparrow/alpha_mean"] == pytest.approx(expected["sparse/alpha_mean"], abs=1e-5)
    assert sum(s.count for s in stats) == sum(len(r.token_ids) for r in rollouts)
