"""TrainConfig load/override/validation, the chain task, and RolloutBatch layout."""

import json

import pytest
import torch

from distill.config import DistillConfig
from sparrow_sgl.config import ConfigError
from sparrow_sgl.rl.batch import RolloutBatch
from sparrow_sgl.rl.config import TrainConfig
from sparrow_sgl.rl.tasks import ChainTask, build_task, encode_prompt
from sparrow_sgl.rollout import Rollout


def test_config_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: /m\nlr: 1e-5\ntask_args: {hops: 2}\ndistill: {every: 3}\n")
    overrides = ["lr=2e-5", "distill.enabled=true", "task_args.num_vars=[10, 20]", "schedule=fixed:64"]
    cfg = TrainConfig.load(path, overrides)
    assert cfg.lr == 2e-5 and cfg.schedule == "fixed:64"
    assert isinstance(cfg.distill, DistillConfig) and cfg.distill.enabled and cfg.distill.every == 3
    assert cfg.task_args == {"hops": 2, "num_vars": [10, 20]}
    cfg.save(tmp_path / "c.json")
    again = TrainConfig.load(tmp_path / "c.json")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "data, match",
    [
        ({"lr": -1.0}, "lr > 0"),
        ({"nope": 1}, "unknown key"),
        ({"distill": {"bogus": 1}}, r"distill: unknown key"),
        ({"prompts_per_step": 3, "group_size": 2, "mini_batches": 4}, "must divide"),
        ({"mismatch": "bad"}, "mismatch must be one of"),
        ({"group_size": 0}, "positive integer"),
    ],
)
def test_config_rejects_bad_values(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_config_errors_on_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.load(tmp_path / "none.yaml")
    (tmp_path / "c.yaml").write_text("lr: 1.0e-5\n")
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig.load(tmp_path / "c.yaml", ["lr"])


def test_chain_task_is_deterministic_and_scored():
    task = ChainTask(num_vars=[20, 40], hops=3, seed=1)
    a, b = task.sample(5), task.sample(5)
    assert a == b and task.sample(6) != a
    chain = a.meta["chain"]
    assert a.reference == " = ".join(chain) and a.answer == chain[-1]
    for i in range(3):  # every hop is an assignment in the prompt
        assert f"{chain[i]} = {chain[i + 1]} ;" in a.prompt + " ;" or f"{chain[i]} = {chain[i + 1]} ." in a.prompt
    assert task.score(a.reference, a) == 1.0
    # 5 items (the asked variable, 3 hops, the number); the first two are right
    assert task.score(" = ".join(chain[:2] + ["x999", chain[-1]]), a) == pytest.approx(2 / 5)
    assert task.score("garbage", a) == 0.0
    exact = ChainTask(num_vars=[20, 40], hops=3, seed=1, partial=False)
    assert exact.score(f"{chain[0]} = {chain[-1]}", a) == 1.0


def test_chain_task_length_grows_with_num_vars_and_filler():
    short, long = ChainTask(num_vars=20).sample(0), ChainTask(num_vars=200).sample(0)
    assert len(long.prompt) > 8 * len(short.prompt)
    padded = ChainTask(num_vars=20, filler=[30, 40]).sample(0)
    assert len(padded.prompt) > 8 * len(short.prompt)
    assert padded.meta["chain"] != short.meta["chain"] or padded.prompt != short.prompt


def test_chain_task_rejects_bad_args():
    with pytest.raises(ConfigError, match="num_vars"):
        ChainTask(num_vars=2, hops=3)
    with pytest.raises(ConfigError, match="unknown task"):
        build_task("what")
    with pytest.raises(ConfigError, match=r"chain task: unknown task_args nope \(known: .*num_vars"):
        build_task("chain", {"nope": 1})


def test_jsonl_task(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    task = build_task(str(path))
    assert task.sample(3).answer == "2"
    with pytest.raises(ConfigError, match="unknown task_args hops"):
        build_task(str(path), {"hops": 2})
    with pytest.raises(ConfigError, match="not found"):
        build_task(str(tmp_path / "missing.jsonl"))


def test_encode_prompt_ends_with_assistant_header():
    from sparrow_sgl.tiny import build_tokenizer

    tok = build_tokenizer(512)
    ids = encode_prompt(tok, "find x1")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_rollout_batch_alignment_and_split():
    rs = [
        Rollout(
            [1, 2, 3],
            [4, 5],
            [-0.1, -0.2],
            prompt_index=0,
            sample_index=0,
            topk_ids=[[4, 1], [5, 2]],
            topk_logprobs=[[-0.1, -3.0], [-0.2, -2.0]],
        ),
        Rollout(
            [1, 2],
            [6, 7, 8, 9],
            [-1.0, -1.1, -1.2, -1.3],
            prompt_index=1,
            sample_index=0,
            topk_ids=[[6, 0]] * 4,
            topk_logprobs=[[-1.0, -2.0]] * 4,
        ),
    ]
    b = RolloutBatch.from_rollouts(rs, rewards=[1.0, 0.0], advantages=[0.5, -0.5], pad_id=0, with_topk=True)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [1, 2, 6, 7, 8, 9]]
    assert b.response_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.rollout_logprobs[0, 3].item() == pytest.approx(-0.1)
    assert b.advantages[1].tolist() == [0, 0, -0.5, -0.5, -0.5, -0.5]
    assert b.positions[1].tolist() == list(range(6))
    assert b.rollout_topk_ids.shape == (2, 6, 2) and b.rollout_topk_ids[0, 4].tolist() == [5, 2]
    assert b.prompt_ids(1) == [1, 2] and b.response_ids(0) == [4, 5]
    first = b.select([0])
    assert first.input_ids.shape == (1, 5)  # trimmed to its own length
    halves = b.split(2)
    assert [len(h) for h in halves] == [1, 1]
    with pytest.raises(ValueError, match="cannot be split"):
        b.split(3)
    assert b.num_response_tokens == 6


def test_rollout_batch_rejects_inconsistent_rollouts():
    with pytest.raises(ValueError, match="log-probs"):
        RolloutBatch.from_rollouts([Rollout([1], [2, 3], [-0.1])], [0.0], [0.0])
    with pytest.raises(ValueError, match="zero rollouts"):
        RolloutBatch.from_rollouts([], [], [])
    with pytest.raises(ValueError, match="top-k"):
        RolloutBatch.from_rollouts([Rollout([1], [2], [-0.1])], [0.0], [0.0], with_topk=True)
    with pytest.raises(ValueError, match="expected"):
        RolloutBatch(
            *(torch.zeros(2, 3, dtype=torch.bool) for _ in range(3)),
            torch.zeros(2, 3),
            torch.zeros(2, 3),
            torch.zeros(2, 4),
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(2),
        )


def test_example_train_config_loads():
    from pathlib import Path

    from sparrow_sgl.demo import PROFILES

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_chain.yaml"
    cfg = TrainConfig.load(path, ["model=/some/model"])
    assert cfg.model == "/some/model" and cfg.tailguard
    # it trains on what `sparrow demo` (CPU) leaves in runs/demo/: that schedule's pages, bins and task
    demo = PROFILES["pretrained"]
    assert (cfg.page_size, cfg.bin_tokens, cfg.task_args) == (demo.page_size, demo.bin_tokens, demo.task)
