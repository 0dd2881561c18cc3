"""Helpers for the OpenRLHF tests: a tiny prompt set, a reward file, and the entry point as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = [sys.executable, "-m", "sparrow_sgl.openrlhf.train_ppo_ray"]

REWARD_FILE = '''
import torch

def reward_func(queries, prompts, labels, **kw):
    r = [float(len(q) % 3) / 2.0 for q in queries]
    return {"rewards": torch.tensor(r), "scores": torch.tensor(r),
            "extra_logs": {"test_reward_len": torch.tensor([float(len(q)) for q in queries])}}
'''


def write_inputs(tmp: Path, num_prompts: int = 2) -> tuple[Path, Path]:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"input": f"Question: what is {i} + {i}? The answer is", "label": str(2 * i)}) + "\n"
        for i in range(num_prompts)
    ))
    reward = tmp / "reward.py"
    reward.write_text(REWARD_FILE)
    return prompts, reward


def grpo_args(model: str | Path, tmp: Path, *extra: str, num_prompts: int = 2) -> list[str]:
    """One GRPO step on CPU: 2 prompts x 2 samples, ZeRO-2, TIS (token clip), OpenRLHF's own group_norm."""
    prompts, reward = write_inputs(tmp, num_prompts)
    return [
        "--actor.model_name_or_path", str(model), "--vllm.num_engines", "1", "--vllm.sync_backend", "gloo",
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1",
        "--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
        "--algo.advantage.is_correction_level", "token", "--algo.advantage.is_correction_mode", "clip",
        "--reward.remote_url", str(reward), "--data.prompt_dataset", str(prompts),
        "--data.input_key", "input", "--data.label_key", "label",
        "--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2", "--rollout.micro_batch_size", "2",
        "--train.batch_size", "4", "--train.micro_batch_size", "2",
        "--rollout.max_new_tokens", "16", "--data.max_len", "64", "--train.num_episodes", "1",
        "--data.max_samples", str(num_prompts),
        "--ds.zero_stage", "2", "--ds.attn_implementation", "eager",
        "--actor.adam.lr", "1e-3", "--actor.lr_scheduler", "constant",  # a step large enough to change bf16 weights
        "--ckpt.output_dir", str(tmp / "out"), "--logger.tensorboard_dir", str(tmp / "tb"),
        *extra,
    ]


def run_entry(args: list[str], cwd: Path, timeout: float = 600.0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*ENTRY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tensorboard_scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for events in tb_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def perturbed_policy(model_dir, seed: int):
    """The tiny model with every weight moved by 0.05 x N(0, 1): a trainer policy that differs from the engine's."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model
