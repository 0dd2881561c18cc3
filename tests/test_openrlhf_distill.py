"""DistillSparse inside OpenRLHF's own `train()` (CPU, embedded engine), and a reward function that fails.

One GRPO step with `--sparrow.distill.enabled` on a sparse schedule (fixed:64: decode past 64 KV tokens is sparse;
the re-planner then finds fixed:48 holding tau on this model and switches the engines to it),
rewards from the project's `rewards/openrlhf.py` with one prompt's label broken (its scorer raises), a checkpoint
saved; then one `--ckpt.load_enable` restart on that checkpoint (its data loader is exhausted: OpenRLHF only
re-syncs the engines). ~4 min on 2 cores for both runs.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openrlhf")

from openrlhf_helpers import ROOT, grpo_args, read_jsonl, run_entry, tensorboard_scalars  # noqa: E402

pytestmark = [pytest.mark.openrlhf, pytest.mark.timeout(900)]

BAD_LABEL = json.dumps({"kind": "poetry"})  # rewards.labels refuses the kind: the scorer raises for this sample
MODEL = dict(hidden_size=128, intermediate_size=256, seed=3)


def _args(model, tmp, *extra):
    prompts = tmp / "labelled.jsonl"
    prompts.write_text(json.dumps({"input": "Question: what is 0 + 0? The answer is", "label": "0"}) + "\n"
                       + json.dumps({"input": "Write a poem about the number 1.", "label": BAD_LABEL}) + "\n")
    return grpo_args(
        model, tmp, "--sparrow.engine", "embedded", "--sparrow.schedule", "fixed:64", "--sparrow.topk", "4",
        "--sparrow.distill.enabled", "--sparrow.distill.lr", "1e-2", "--sparrow.distill.replan_every", "1",
        "--sparrow.distill.heldout_prompts", "2", "--sparrow.distill.replan_samples", "1",
        "--sparrow.tau", "0.5",  # fixed:48 measured 0.889 here: far from the threshold, the switch is not a coin toss
        "--rollout.max_new_tokens", "96", "--data.max_len", "160",
        "--reward.remote_url", str(ROOT / "rewards" / "openrlhf.py"), "--data.prompt_dataset", str(prompts),
        "--ckpt.save_steps", "1", "--ckpt.path", str(tmp / "ckpt"), *extra,
    )


@pytest.fixture(scope="module")
def run(tiny_model_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openrlhf-distill")
    done = run_entry(_args(tiny_model_factory(**MODEL), tmp), tmp)
    (tmp / "entry.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-6000:])
    return tmp, done


def _canaries(tmp) -> list[dict]:
    calls = read_jsonl(tmp / "out" / "sparrow" / "engine_0.jsonl")
    return [e["canary"] for e in calls if e["call"] == "update_weights"]


def _greedy(model_dir, prompt, adapter=None):
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine, SamplingParams

    engine = Engine(EngineConfig(model=str(model_dir), num_kv_pages=64))
    engine.set_adapter(adapter)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    return engine.generate([prompt], params, "dense", progress=False)[0]


def test_distill_step_and_replan_in_openrlhf_metrics(run):
    tmp, _ = run
    scalars = tensorboard_scalars(tmp / "tb")
    for key in ("loss", "pg_loss", "kl", "grad_norm", "seconds", "budget_max", "replan_action", "replan_tail_min",
                "rollout_gap", "log_ratio_abs"):
        assert f"train/sparrow/distill_{key}" in scalars, sorted(scalars)
    assert "train/policy_loss" in scalars and "train/sparrow/tail_bin_0" in scalars
    assert scalars["train/sparrow/distill_kl"][0] > 0  # fixed:64 on ~105-token sequences: sparse != dense
    # the trainer's sparse teacher-forced forward reproduces the engine's sparse rollout (bf16 trainer, fp32 engine;
    # θ did not move: every reward is 0, so no advantage): a misaligned token, position or schedule would be far off
    # (and far better than the dense policy does: log_ratio_abs is sparse vs dense; measured 0.0014 vs 0.016 nats)
    gap = scalars["train/sparrow/distill_rollout_gap"][0]
    assert gap < 0.05 and gap < 0.5 * scalars["train/sparrow/distill_log_ratio_abs"][0]
    replans = read_jsonl(tmp / "out" / "sparrow" / "distill" / "replan.jsonl")
    assert [(e["action"], e["new_budgets"]) for e in replans] == [("switch", [48])]  # 64 * 0.75 = 48 holds tau
    assert scalars["train/sparrow/distill_replan_action"][0] == 1
    assert scalars["train/sparrow/distill_budget_max"][0] == 48
    calls = read_jsonl(tmp / "out" / "sparrow" / "engine_0.jsonl")
    switched = [i for i, e in enumerate(calls) if e["call"] == "set_schedule" and "48 tok" in e["schedule"]]
    assert switched and switched[0] < [e["call"] for e in calls].index("update_weights")  # before the next rollout


def test_adapter_changes_and_engines_serve_theta_plus_adapter(run, tiny_model_factory):
    """φ moved; after the sync the engine's canary is θ + φ (the trainer compared it with θ + φ), the model
    OpenRLHF saved is θ alone, and θ + the saved adapter on a fresh engine reproduces the canary."""
    from safetensors.torch import load_file

    tmp, _ = run
    adapter = tmp / "out" / "sparrow" / "distill" / "adapter"
    lora_b = [t for k, t in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and max(float(t.abs().max()) for t in lora_b) > 1e-3  # B starts at zero
    calls = [e["call"] for e in read_jsonl(tmp / "out" / "sparrow" / "engine_0.jsonl")]
    assert calls.index("set_adapter") < calls.index("update_weights")
    sync = [e for e in read_jsonl(tmp / "out" / "sparrow" / "trainer.jsonl") if e["event"] == "weight_sync"]
    assert sync[-1]["canary_reference"] == "policy+distill_lora" and sync[-1]["canary_max_abs_diff"] < 0.05
    saved = load_file(str(next((tmp / "out").glob("*.safetensors"))))
    assert not any("lora" in k for k in saved)  # the trainer's dense policy never held φ
    canary = _canaries(tmp)[-1]
    served = _greedy(tmp / "out", canary["prompt"], adapter)
    assert served.token_ids == canary["token_ids"]
    assert max(abs(a - b) for a, b in zip(served.logprobs, canary["logprobs"])) < 1e-4
    plain = _greedy(tmp / "out", canary["prompt"])
    assert max(abs(a - b) for a, b in zip(plain.logprobs, canary["logprobs"])) > 1e-3  # φ is really served


def test_reward_error_scores_zero_with_reason_and_the_step_goes_on(run):
    tmp, done = run
    scalars = tensorboard_scalars(tmp / "tb")
    assert scalars["train/reward_error"][0] == pytest.approx(0.5)  # 2 of 4 samples carry the broken label
    assert scalars["train/reward_error_label"][0] == pytest.approx(0.5)  # the reason's class, in the metrics
    assert scalars["train/reward_error_score"][0] == 0.0 and scalars["train/reward"][0] == 0.0
    assert "train/policy_loss" in scalars and len(_canaries(tmp)) == 1  # trained and synced
    assert "kind must be one of" in done.stdout + done.stderr  # the reason, from the engine's process log


def test_resume_restores_the_adapter_and_the_engines_get_it_back(run, tiny_model_factory):
    tmp, _ = run
    state = tmp / "ckpt" / "_actor" / "global_step1" / "sparrow_distill.pt"
    assert state.is_file()
    before = _canaries(tmp)[-1]
    (tmp / "out" / "sparrow" / "engine_0.jsonl").unlink()
    done = run_entry(_args(tiny_model_factory(**MODEL), tmp, "--ckpt.load_enable"), tmp)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    calls = [e["call"] for e in read_jsonl(tmp / "out" / "sparrow" / "engine_0.jsonl")]
    assert "generate_responses" not in calls  # the loader was exhausted: only OpenRLHF's resume sync ran
    assert calls.index("set_adapter") < calls.index("update_weights")
    log = read_jsonl(tmp / "out" / "sparrow" / "engine_0.jsonl")
    assert "64 tok" in log[0]["schedule"]  # the flag's schedule at start, then the re-planner's, restored
    assert any(e["call"] == "set_schedule" and "48 tok" in e["schedule"] for e in log)
    after = _canaries(tmp)[-1]
    assert after["token_ids"] == before["token_ids"]
    assert max(abs(a - b) for a, b in zip(after["logprobs"], before["logprobs"])) < 1e-4
    sync = [e for e in read_jsonl(tmp / "out" / "sparrow" / "trainer.jsonl") if e["event"] == "weight_sync"]
    assert sync[-1]["canary_reference"] == "policy+distill_lora" and sync[-1]["canary_max_abs_diff"] < 0.05


def test_experience_batch_aligns_openrlhf_actions_with_tokens():
    """OpenRLHF's action column j is token j + 1; the distill batch keeps each value in its token's column."""
    import torch
    from openrlhf.trainer.ppo_utils.experience import Experience

    from sparrow_sgl.openrlhf.distill_hook import experience_batch, heldout_prompts, live_tails

    def item(prompt, response):
        seq = torch.tensor(prompt + response)
        action = torch.tensor([0] * (len(prompt) - 1) + [1] * len(response))
        value = action * torch.arange(1, len(seq), dtype=torch.float32)  # the token index it belongs to
        return Experience(sequences=seq, attention_mask=torch.ones_like(seq), action_mask=action,
                          action_log_probs=-value, rollout_log_probs=-2 * value, advantages=value / 10)

    batch, dense = experience_batch([item([5, 6, 7], [8, 9, 10]), item([5, 6], [11])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [5, 6, 11, 0, 0, 0]]
    assert batch.prompt_lens.tolist() == [3, 2] and batch.response_lens.tolist() == [3, 1]
    assert batch.response_mask.tolist()[0] == [False, False, False, True, True, True]
    assert dense.tolist() == [[0, 0, 0, -3, -4, -5], [0, 0, -2, 0, 0, 0]]
    assert batch.rollout_logprobs[0, 3:].tolist() == [-6, -8, -10]
    assert batch.advantages[1, 2].item() == pytest.approx(0.2)
    assert heldout_prompts([item([5, 6, 7], [8]), item([5, 6, 7], [9]), item([4], [1])], 5) == [[5, 6, 7], [4]]
    tailed = item([5], [6])  # tails.py's batch statistics, as every sample's info carries them
    tailed.info = {"sparrow/tail_bin_1": torch.tensor(0.7), "sparrow/tail_tokens_1": torch.tensor(30.0),
                   "sparrow/tail_min": torch.tensor(0.7), "reward": torch.tensor(1.0)}
    (stat,) = live_tails([tailed], bin_tokens=2048).items()
    assert stat[0] == 1 and (stat[1].start, stat[1].end, stat[1].count) == (2048, 4096, 30)
    assert stat[1].tail == pytest.approx(0.7)
    assert live_tails([item([5], [6])], 2048) is None
