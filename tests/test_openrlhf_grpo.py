"""One full GRPO step through OpenRLHF's own `train()` on a local Ray cluster (CPU), the embedded engine rolling out.

The run happens once per module (~2 min on 2 cores, mostly imports and Ray start-up); the tests read what it left:
OpenRLHF's TensorBoard metrics, the engine's call log, the trainer's sync log and the saved model.
"""

from __future__ import annotations

import pytest

pytest.importorskip("openrlhf")

from openrlhf_helpers import grpo_args, read_jsonl, run_entry, tensorboard_scalars  # noqa: E402

pytestmark = [pytest.mark.openrlhf, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def run(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory(hidden_size=128, intermediate_size=256, seed=3)
    tmp = tmp_path_factory.mktemp("openrlhf-grpo")
    done = run_entry(grpo_args(model, tmp, "--sparrow.engine", "embedded", "--sparrow.schedule", "fixed:64",
                                   "--sparrow.topk", "4", "--sparrow.guard"), tmp)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-6000:])
    return tmp, done


def test_step_finishes_with_rewards_tails_and_sparse_stats_in_openrlhf_metrics(run):
    tmp, _ = run
    scalars = tensorboard_scalars(tmp / "tb")
    for key in ("train/reward", "train/test_reward_len", "train/vllm_kl", "train/sparrow_kv_tokens_mean",
                "train/sparrow_decode_steps", "train/policy_loss"):
        assert key in scalars, sorted(scalars)
    # log-probs with temperature applied, from the same weights: the rollout/trainer KL is numerics only
    assert abs(scalars["train/vllm_kl"][0]) < 1e-2
    # the step's 2 prompts x 2 samples, sent as two RPCs, ran as one engine batch (the batcher waits for them)
    assert scalars["train/sparrow_batch_samples"][0] == 4
    assert scalars["train/sparrow_graph_captures"][0] == 0  # CUDA graphs exist on GPU only
    assert scalars["train/sparrow_decode_ms_per_step"][0] > 0 and scalars["train/sparrow_prefill_s"][0] > 0
    # fixed:64 attends at most 64 KV tokens per (sparse layer, KV head, step)
    assert 0 < scalars["train/sparrow_kv_tokens_mean"][0] <= 64
    # the tail, measured in the trainer's own forward against the rollout's top-4, next to vllm_kl
    assert 0.0 <= scalars["train/sparrow/tail_bin_0"][0] <= 1.0
    assert scalars["train/sparrow/tail_min"][0] == scalars["train/sparrow/tail_bin_0"][0]


def test_engine_calls_in_openrlhf_order(run):
    tmp, _ = run
    calls = [e["call"] for e in read_jsonl(tmp / "out" / "sparrow" / "engine_0.jsonl")]
    assert calls[:2] == ["init", "init_process_group"]
    # a random tiny model's top-4 tail is far below tau: TailGuard raises the budget before the sync
    assert calls[2:] == ["generate_responses", "generate_responses", "set_schedule", "update_weights"]


def test_weights_reach_the_engine(run, tiny_model_factory):
    """The engine's greedy canary after the sync equals (a) the trainer's own log-probs of those tokens and (b) a
    fresh engine loaded from the model OpenRLHF saved at the end."""
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine, SamplingParams

    tmp, _ = run
    sync = [e for e in read_jsonl(tmp / "out" / "sparrow" / "trainer.jsonl") if e["event"] == "weight_sync"]
    assert len(sync) == 1 and sync[0]["tensors"] > 0
    assert sync[0]["canary_max_abs_diff"] < 0.05  # bf16 trainer vs float32 engine
    canary = [e for e in read_jsonl(tmp / "out" / "sparrow" / "engine_0.jsonl") if e["call"] == "update_weights"]
    canary = canary[-1]["canary"]
    engine = Engine(EngineConfig(model=str(tmp / "out"), num_kv_pages=64))
    fresh = engine.generate([canary["prompt"]], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True),
                            "dense", progress=False)[0]
    assert fresh.token_ids == canary["token_ids"]
    assert max(abs(a - b) for a, b in zip(fresh.logprobs, canary["logprobs"])) < 1e-4
    base = tiny_model_factory(hidden_size=128, intermediate_size=256, seed=3)
    before = Engine(EngineConfig(model=str(base), num_kv_pages=64)).generate(
        [canary["prompt"]], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True), "dense",
        progress=False)[0]
    assert before.logprobs != fresh.logprobs  # the step changed the weights, and the engine serves the new ones


def test_resume_starts_the_engines_on_the_guards_schedule(run, tiny_model_factory):
    """A second run with --ckpt.load_enable on the same output: the engine starts on the schedule TailGuard saved,
    and the guard's step count goes on."""
    import json

    tmp, _ = run
    saved = json.loads((tmp / "out" / "sparrow" / "guard_state.json").read_text())
    assert saved["step"] == 1 and saved["schedule"]["budgets"][0] > 64
    (tmp / "out" / "sparrow" / "engine_0.jsonl").unlink()
    model = tiny_model_factory(hidden_size=128, intermediate_size=256, seed=3)
    done = run_entry(grpo_args(model, tmp, "--sparrow.engine", "embedded", "--sparrow.schedule", "fixed:64",
                               "--sparrow.topk", "4", "--sparrow.guard", "--ckpt.load_enable"), tmp)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    init = read_jsonl(tmp / "out" / "sparrow" / "engine_0.jsonl")[0]
    assert f"{saved['schedule']['budgets'][0]} tok" in init["schedule"]
    assert json.loads((tmp / "out" / "sparrow" / "guard_state.json").read_text())["step"] == 2
