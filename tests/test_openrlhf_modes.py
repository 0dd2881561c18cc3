"""OpenRLHF's other two ways of driving its engines, each one full step on CPU with the embedded engine: colocated
with sleep / wake-up (and prefix caching), and async with partial rollout. The engines log every call; the order
must be OpenRLHF's (samples_generator.py:67-120, ppo_trainer.py:300-316, ppo_trainer_async.py:250-262)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("openrlhf")

from openrlhf_helpers import grpo_args, read_jsonl, run_entry  # noqa: E402

pytestmark = [pytest.mark.openrlhf, pytest.mark.timeout(900)]

MODES = {
    "colocated": ["--train.colocate_all", "--vllm.enable_sleep", "--vllm.enable_prefix_caching"],
    "async_partial": ["--train.async_enable", "--train.partial_rollout_enable"],
}


def _calls(tiny_model_dir, tmp_path, mode: str) -> list:
    args = grpo_args(tiny_model_dir, tmp_path, "--sparrow.engine", "embedded", *MODES[mode])
    done = run_entry(args, tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    events = read_jsonl(tmp_path / "out" / "sparrow" / "engine_0.jsonl")
    return [(e["call"], tuple(e["tags"])) if e["call"] == "wake_up" else e["call"] for e in events]


def test_colocated_sleep_and_wake_up_order(tiny_model_dir, tmp_path):
    calls = _calls(tiny_model_dir, tmp_path, "colocated")
    assert calls[:3] == ["init", "sleep", "init_process_group"]  # asleep from creation on (vllm_engine.py:308)
    step = calls[3:]
    assert step[:4] == [("wake_up", ("weights", "kv_cache")), "generate_responses", "generate_responses", "sleep"]
    # weights only for the sync, cache reset first (prefix caching); the KV cache wakes before the next rollout
    assert step[4:7] == [("wake_up", ("weights",)), "reset_prefix_cache", "update_weights"]


def test_async_partial_rollout_pauses_around_the_sync(tiny_model_dir, tmp_path):
    calls = _calls(tiny_model_dir, tmp_path, "async_partial")
    assert calls[:2] == ["init", "init_process_group"]
    sync = calls.index("update_weights")
    assert calls[sync - 1] == "pause_generation" and calls[sync + 1] == "resume_generation"
    assert calls.index("generate_responses") < sync


def test_wake_up_resumes_only_what_sleeps(tmp_path):
    """OpenRLHF: sleep after creation, wake_up(["weights"]) for the sync, then wake_up() before the rollout; the
    backend (an SGLang server refuses to resume memory it has not released) is asked for the KV cache only."""
    from sparrow_sgl.openrlhf.rollout_actor import SparrowRolloutActor

    actor = object.__new__(SparrowRolloutActor.__ray_metadata__.modified_class)
    resumed, released = [], []
    actor.backend = SimpleNamespace(release_memory=released.append, resume_memory=resumed.append)
    actor.batcher = SimpleNamespace(lock=asyncio.Lock(), num_unfinished=0)
    actor.events, actor.index, actor.asleep = tmp_path / "events.jsonl", 0, set()

    async def steps():
        await actor.sleep()
        await actor.wake_up(["weights"])
        await actor.wake_up()
        await actor.wake_up()  # all awake: nothing to resume
    asyncio.run(steps())
    assert released == [["weights", "kv_cache"]] and resumed == [["weights"], ["kv_cache"]] and not actor.asleep
