"""Weight sync over the weights-update group (gloo on CPU): this test process is the trainer's rank 0, a real
`SparrowRolloutActor` (embedded engine) or a silent stand-in on a local Ray cluster is the engine."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import torch

pytest.importorskip("openrlhf")
ray = pytest.importorskip("ray")

from openrlhf_helpers import perturbed_policy  # noqa: E402

from sparrow_sgl.openrlhf.flags import SGLangFlags, SparrowFlags, to_dict  # noqa: E402
from sparrow_sgl.openrlhf.trainer_sync import canary_diff, push  # noqa: E402
from sparrow_sgl.openrlhf.weight_sync import GROUP_NAME, SyncError, hf_named_tensors, init_group  # noqa: E402

pytestmark = [pytest.mark.openrlhf, pytest.mark.timeout(600)]
TIMEOUT = 8.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory(hidden_size=128, intermediate_size=256, seed=3)


@pytest.fixture(scope="module")
def engine(cluster, model_dir, tmp_path_factory):
    from sparrow_sgl.openrlhf.rollout_actor import SparrowRolloutActor

    sparrow = SparrowFlags(engine="embedded", sync_timeout=TIMEOUT, canary_tokens=6)
    sections = to_dict(sparrow, SGLangFlags())
    actor = SparrowRolloutActor.options(num_cpus=0).remote(
        index=0, model=str(model_dir), sparrow=sections["sparrow"], sglang=sections["sglang"], seed=0,
        max_model_len=256, out_dir=str(tmp_path_factory.mktemp("sync-out")),
    )
    ray.get(actor.get_schedule.remote())  # constructed (imports, engine) before the group's clock starts
    port = _port()
    ref = actor.init_process_group.remote("127.0.0.1", port, 1, 2, GROUP_NAME, "gloo")
    group = init_group("127.0.0.1", port, 0, 2, GROUP_NAME, "gloo", TIMEOUT)
    ray.get(ref, timeout=TIMEOUT)
    return actor, group, sparrow


def test_push_reaches_the_engine_and_the_canary_matches(engine, model_dir):
    actor, group, sparrow = engine
    before = ray.get(actor.canary.remote())
    policy = perturbed_policy(model_dir, seed=1)
    canaries = push(policy, [actor], group, sparrow)
    assert canaries[0]["logprobs"] != before["logprobs"]
    assert canary_diff(policy, canaries[0]) < 1e-4  # float32 on both sides: equal up to kernel order


def test_lora_policy_is_sent_merged(engine, model_dir):
    from peft import LoraConfig, get_peft_model

    actor, group, sparrow = engine
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    policy = get_peft_model(perturbed_policy(model_dir, seed=2), lora)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    names = [n for n, _ in hf_named_tensors(policy)]
    assert all("lora_" not in n and "base_layer" not in n and not n.startswith("base_model") for n in names)
    canary = push(policy, [actor], group, sparrow)[0]
    assert canary_diff(policy, canary) < 1e-4  # the engine serves W + scale * B @ A, what the PEFT policy computes
    plain = perturbed_policy(model_dir, seed=2)
    assert canary_diff(plain, canary) > 1e-3  # and the adapter mattered


@ray.remote
class Silent:
    """An engine that never answers (init or update) — the sync must fail within its timeout, not hang."""

    async def init_process_group(self, *args, **kwargs):
        await asyncio.sleep(3600)

    async def join(self, port):
        self.group = await asyncio.to_thread(init_group, "127.0.0.1", port, 1, 2, GROUP_NAME + "-silent", "gloo",
                                             TIMEOUT)

    async def update_weights(self, *args, **kwargs):
        await asyncio.sleep(3600)


def test_engine_that_never_joins_fails_within_timeout(cluster):
    silent = Silent.options(num_cpus=0).remote()
    silent.init_process_group.remote()
    start = time.monotonic()
    with pytest.raises(SyncError, match="did not form within"):
        init_group("127.0.0.1", _port(), 0, 2, GROUP_NAME + "-never", "gloo", 3.0)
    assert time.monotonic() - start < 30


def test_engine_that_never_receives_fails_within_timeout(cluster, model_dir):
    silent = Silent.options(num_cpus=0).remote()
    port = _port()
    joined = silent.join.remote(port)
    group = init_group("127.0.0.1", port, 0, 2, GROUP_NAME + "-silent", "gloo", TIMEOUT)
    ray.get(joined, timeout=TIMEOUT)
    start = time.monotonic()
    with pytest.raises(SyncError, match="weight sync"):
        push(perturbed_policy(model_dir, seed=3), [silent], group, SparrowFlags(engine="embedded", sync_timeout=3.0))
    assert time.monotonic() - start < 3.0 * 4 + 10
