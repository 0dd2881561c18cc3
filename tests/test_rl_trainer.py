"""The embedded GRPO loop on a tiny model: numerics agreement, weight sync, resume, checkpoints, monitoring."""

import json

import pytest
import torch

from sparrow_sgl.config import Schedule
from sparrow_sgl.rl import checkpoint as ckpt_mod
from sparrow_sgl.rl import trainer as trainer_mod
from sparrow_sgl.rl.batch import RolloutBatch
from sparrow_sgl.rl.checkpoint import find_checkpoint, load_checkpoint
from sparrow_sgl.rl.config import TrainConfig
from sparrow_sgl.rl.loss import importance_weights
from sparrow_sgl.rl.metrics import read_jsonl, tail_metrics
from sparrow_sgl.rl.recompute import recompute_old
from sparrow_sgl.rl.tasks import TaskSample
from sparrow_sgl.rl.trainer import Trainer, load_policy

# engine (paged, incremental decode) vs transformers (one causal forward), both float32 on CPU
LOGPROB_ATOL = 1e-4


class DigitTask:
    """Short prompts; reward = fraction of digits in the response, so a random policy gets varied rewards."""

    name = "digits"

    def sample(self, index: int) -> TaskSample:
        return TaskSample(f"count {index} : 1 2 3 4 5 6 7 8 9 and then some more words to read", "")

    def score(self, response: str, sample: TaskSample) -> float:
        return sum(c.isdigit() for c in response) / max(len(response), 1)


def make_cfg(model_dir, out_dir, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        out_dir=str(out_dir),
        steps=2,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=8,
        page_size=4,
        schedule="fixed:16",
        bin_tokens=16,
        lr=1e-2,
        micro_batch_size=4,
        progress=False,
        plot=False,
        kv_gb=0.002,
        hardware="cpu",
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(cfg) -> Trainer:
    return Trainer(cfg, task=DigitTask())


def test_dense_recompute_equals_engine_dense_scoring(tiny_model_dir, tmp_path):
    tr = make_trainer(make_cfg(tiny_model_dir, tmp_path, schedule="dense"))
    rollouts = tr.engine.generate([[5, 6, 7, 8, 9] * 5, [11, 12, 13]], tr._sampling_params(), "dense", progress=False)
    batch = tr._make_batch(rollouts, [0.0] * len(rollouts))
    old = recompute_old(tr.policy, batch, micro_batch_size=3)
    scored = tr.engine.score([r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts], sparse=None)
    for i, (r, s) in enumerate(zip(rollouts, scored)):
        p = len(r.prompt_ids)
        recomputed = old.logprobs[i, p : p + len(r.token_ids)]
        torch.testing.assert_close(recomputed, s.logprobs, atol=LOGPROB_ATOL, rtol=0)
        torch.testing.assert_close(recomputed, torch.tensor(r.logprobs), atol=LOGPROB_ATOL, rtol=0)
    # and so the TIS weight of a dense rollout is 1 up to that tolerance, nothing truncated
    w = importance_weights(old.logprobs, batch.rollout_logprobs, batch.response_mask)
    assert (w.weights[batch.response_mask] - 1).abs().max() < 2 * LOGPROB_ATOL
    assert not w.truncated.any()


def test_two_steps_change_weights_and_the_engine_serves_them(tiny_model_dir, tmp_path):
    tr = make_trainer(make_cfg(tiny_model_dir, tmp_path))
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    records = tr.train()
    assert [r["step"] for r in records] == [1, 2]
    assert any(r["train/grad_norm"] > 0 for r in records)
    changed = [k for k, v in tr.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no weight moved after two GRPO steps"
    prompt, response = [[5, 6, 7, 8, 9, 10]], [[20, 21, 22, 23]]
    served = tr.engine.score(prompt, response, sparse=None)[0].logprobs
    trained = _policy_logprobs(tr.policy, prompt[0], response[0])
    fresh = _policy_logprobs(load_policy(str(tiny_model_dir)), prompt[0], response[0])
    torch.testing.assert_close(served, trained, atol=LOGPROB_ATOL, rtol=0)
    assert (served - fresh).abs().max() > 100 * LOGPROB_ATOL


def _policy_logprobs(model, prompt, response):
    from sparrow_sgl.rollout import Rollout

    batch = RolloutBatch.from_rollouts([Rollout(prompt, response, [0.0] * len(response))], [0.0], [0.0])
    return recompute_old(model, batch, 1).logprobs[0, len(prompt) :]


def test_metrics_names_and_noise_floor_once(tiny_model_dir, tmp_path):
    tr = make_trainer(make_cfg(tiny_model_dir, tmp_path, mini_batches=2))
    tr.train()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    first, second = records
    for key in (
        "timing/rollout",
        "timing/train",
        "timing/step",
        "sparse/tail_p5/min",
        "sparse/kv_budget_mean",
        "sparse/is_truncated_frac",
        "sparse/speedup_predicted",
        "rollout/reward_mean",
        "train/clip_frac",
        "train/entropy",
        "train/grad_norm",
    ):
        assert key in first and key in second, key
    assert any(k.startswith("sparse/tail_p5/bin_") for k in first)
    assert first["sparse/kv_budget_mean"] <= 16 < first["sparse/kv_context_mean"]
    floor = [k for k in first if k.startswith("sparse/noise_floor/")]
    assert floor and not [k for k in second if k.startswith("sparse/noise_floor/")]
    events = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "noise_floor"]
    assert len(events) == 1
    assert first["sparse/noise_floor/tail_p5/min"] > 0.999  # dense engine vs trainer: numerics only


def test_tis_weights_come_from_old_logprobs_across_mini_batches(tiny_model_dir, tmp_path, monkeypatch):
    """Pitfall: after the first optimizer step the policy moves; the TIS weight must not follow it."""
    seen = []
    real = trainer_mod.ppo_clip_loss

    def spy(logprobs, old_logprobs, advantages, response_mask, is_weights=None, **kw):
        seen.append((logprobs.detach().clone(), old_logprobs.clone(), is_weights.clone(), response_mask.clone()))
        return real(logprobs, old_logprobs, advantages, response_mask, is_weights=is_weights, **kw)

    monkeypatch.setattr(trainer_mod, "ppo_clip_loss", spy)
    captured = {}
    real_iw = trainer_mod.importance_weights

    def iw_spy(old, rollout, mask, *a, **kw):
        captured["old"], captured["rollout"] = old.clone(), rollout.clone()
        return real_iw(old, rollout, mask, *a, **kw)

    monkeypatch.setattr(trainer_mod, "importance_weights", iw_spy)
    tr = make_trainer(
        make_cfg(
            tiny_model_dir, tmp_path, steps=1, mini_batches=2, micro_batch_size=2, schedule="dense", noise_floor=False
        )
    )
    tr.train()
    assert len(seen) == 4  # 2 mini-batches x 2 micro-batches
    expected = torch.clamp(torch.exp(captured["old"] - captured["rollout"]), max=2.0)
    rows = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    for (_, old, w, mask), r in zip(seen, rows):
        width = w.shape[1]
        assert torch.allclose(w[mask], expected[r, :width][mask])
        assert torch.equal(old, captured["old"][r, :width])
    # the second mini-batch ran after an optimizer step: its current log-probs moved away from the old ones
    logp, old, _, mask = seen[2]
    assert (logp - old)[mask].abs().max() > 1e-4


def test_resume_reproduces_step_three(tiny_model_dir, tmp_path):
    quick = dict(noise_floor=False, max_new_tokens=6)
    straight = make_trainer(make_cfg(tiny_model_dir, tmp_path / "a", steps=3, **quick))
    want = straight.train()[-1]
    first = make_trainer(make_cfg(tiny_model_dir, tmp_path / "b", steps=2, save_every=1, **quick))
    first.train()
    del first
    resumed = make_trainer(make_cfg(tiny_model_dir, tmp_path / "b", steps=3, **quick))
    assert resumed.resume(tmp_path / "b") == 2
    got = resumed.train()[-1]
    assert got["step"] == want["step"] == 3
    skip = ("timing/", "rollout/tokens_per_s", "sparse/speedup_measured")
    for key, value in want.items():
        if key.startswith(skip) or value is None:
            continue
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [1, 2, 3]


def test_crash_mid_save_keeps_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    tr = make_trainer(make_cfg(tiny_model_dir, tmp_path, steps=1, noise_floor=False, max_new_tokens=4))
    tr.train()  # saves step 1 at the end
    good = find_checkpoint(tmp_path)
    assert good.name == "step_000001"
    tr.step = 2

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        tr.save()
    monkeypatch.undo()
    assert find_checkpoint(tmp_path) == good
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    state, config, _ = load_checkpoint(tmp_path, load_policy(str(tiny_model_dir)))
    assert state.step == 1 and state.cursor == 2 and config["lr"] == 1e-2
    assert Schedule.from_dict(state.schedule).budgets == [16]


def test_tail_metrics_count_response_tokens_only():
    alpha = torch.tensor([[0.1, 0.1, 0.99, 0.98], [0.2, 0.97, 0.96, float("nan")]])
    positions = torch.arange(4).expand(2, 4)
    mask = torch.tensor([[False, False, True, True], [False, True, True, False]])
    out, stats = tail_metrics(alpha, positions, mask, bin_tokens=2, quantile=0.05)
    assert sum(s.count for s in stats) == 4
    assert out["sparse/tail_p5/min"] > 0.95
    assert set(out) >= {"sparse/tail_p5/bin_0", "sparse/tail_p5/bin_1", "sparse/alpha_mean"}


def test_train_cli_runs_with_overrides(tiny_model_dir, tmp_path, capsys):
    from sparrow_sgl.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\nout_dir: {tmp_path / 'run'}\nsteps: 1\nprompts_per_step: 1\ngroup_size: 2\n"
        "max_new_tokens: 4\npage_size: 4\nschedule: fixed:16\nbin_tokens: 16\nprogress: false\nkv_gb: 0.002\n"
        "task_args: {num_vars: 6, hops: 1}\n"
    )
    assert main(["train", "--config", str(config), "--set", "plot=true", "--set", "lr=1e-4"]) == 0
    assert (tmp_path / "run" / "plots" / "reward.png").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 1e-4
    assert main(["train", "--config", str(config), "--resume", str(tmp_path / "run"), "--set", "steps=2"]) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_tailguard_raises_the_budget_on_a_dip_and_is_checkpointed(tiny_model_dir, tmp_path):
    cfg = make_cfg(
        tiny_model_dir,
        tmp_path,
        steps=1,
        tailguard=True,
        tau=0.9999,
        bin_tokens=64,
        schedule="fixed:12",
        noise_floor=False,
    )
    tr = make_trainer(cfg)
    record = tr.train()[-1]
    assert record["sparse/tail_p5/min"] < cfg.tau  # a random tiny model under 3 pages dips below 0.9999
    assert max(tr.schedule.budgets) > 12  # the dipping bin got the next budget of the guard's grid
    events = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "tailguard"]
    assert events and events[0]["old"] == 12 and events[0]["reason"] == "raise"
    state, _, _ = load_checkpoint(tmp_path, load_policy(str(tiny_model_dir)))
    assert state.guard["budgets"] == tr.schedule.budgets
    resumed = make_trainer(make_cfg(tiny_model_dir, tmp_path, steps=1, tailguard=True, tau=0.9999, bin_tokens=64))
    resumed.resume(tmp_path)
    assert resumed.schedule.budgets == tr.schedule.budgets and resumed.guard.budgets == tr.schedule.budgets


def test_small_budget_ladder_fills_the_grid_below_the_paper_presets():
    from sparrow_sgl.rl.trainer import small_budget_ladder

    assert small_budget_ladder(Schedule(budgets=[48, 64], page_size=16)) == [48, 96, 192, 384]
    assert small_budget_ladder(Schedule(budgets=[12], page_size=4)) == [12, 24, 48, 96, 192, 384]
    assert small_budget_ladder(Schedule(budgets=[1024, None], page_size=16)) == []
