"""The colocated CUDA-IPC weight sync on CPU. CUDA IPC itself needs CUDA, so the seam is the tensor just opened from
its handle: the engine side (staging, fail-closed apply) runs for real on the embedded engine, and the trainer
side runs sparrow's patched `broadcast_to_vllm` in colocated mode, with OpenRLHF's IPC broadcast replaced by a
stand-in that feeds each parameter through that seam: after it returns, the canary must run and a mismatch raise."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("openrlhf")
ray = pytest.importorskip("ray")

from openrlhf_helpers import perturbed_policy  # noqa: E402

from sparrow_sgl.openrlhf.embedded_backend import EmbeddedBackend  # noqa: E402
from sparrow_sgl.openrlhf.flags import SGLangFlags, SparrowFlags, to_dict  # noqa: E402
from sparrow_sgl.openrlhf.ipc_sync import IpcReceiver  # noqa: E402
from sparrow_sgl.openrlhf.trainer_sync import broadcast_to_engines, canary_diff  # noqa: E402
from sparrow_sgl.openrlhf.weight_sync import SyncError  # noqa: E402

pytestmark = [pytest.mark.openrlhf, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory(hidden_size=128, intermediate_size=256, seed=3)


def _receiver(backend: EmbeddedBackend) -> IpcReceiver:
    return IpcReceiver(backend.apply_weights, backend.weight_shapes(), backend.device, backend.optional_weights())


def test_ipc_tensors_are_copied_and_applied_only_at_the_last_call(model_dir):
    backend = EmbeddedBackend(str(model_dir), seed=0, max_model_len=128)
    before = backend.canary(6)
    policy = perturbed_policy(model_dir, seed=1)
    named = [(n, p.data.clone()) for n, p in policy.named_parameters()]
    ipc = _receiver(backend)
    for i, (name, tensor) in enumerate(named):
        assert ipc.receive(name, tensor, last=i == len(named) - 1) == (i == len(named) - 1)
        if i == 0:
            assert backend.canary(6).logprobs == before.logprobs  # nothing applied mid-sync
        tensor.fill_(1e3)  # the trainer frees / reuses its clone once the call returned
    assert canary_diff(policy, backend.canary(6).to_dict()) < 1e-4  # the copies, not the reused memory, arrived


@pytest.mark.parametrize("bad", ["shape", "name", "repeat", "incomplete"])
def test_a_failed_ipc_sync_leaves_the_old_weights(model_dir, bad):
    backend = EmbeddedBackend(str(model_dir), seed=0, max_model_len=128)
    before = backend.canary(6)
    named = [(n, p.data) for n, p in perturbed_policy(model_dir, seed=2).named_parameters()]
    ipc = _receiver(backend)
    for name, tensor in named[:3]:
        ipc.receive(name, tensor, last=False)
    name, tensor = named[3]
    if bad == "shape":
        tensor = tensor[..., :-1]
    elif bad == "name":
        name = "base_model.model." + name
    elif bad == "repeat":
        name, tensor = named[0]
    with pytest.raises(SyncError, match="CUDA-IPC sync"):  # "incomplete": the last call after 4 of the tensors
        ipc.receive(name, tensor, last=True)
    assert ipc.staged == {} and backend.canary(6).logprobs == before.logprobs


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    from sparrow_sgl.openrlhf.rollout_actor import SparrowRolloutActor

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    out = tmp_path_factory.mktemp("ipc-out")
    sparrow = SparrowFlags(engine="embedded", sync_timeout=60.0, canary_tokens=6, out_dir=str(out))
    sections = to_dict(sparrow, SGLangFlags())
    actor = SparrowRolloutActor.options(num_cpus=0).remote(
        index=0, model=str(model_dir), sparrow=sections["sparrow"], sglang=sections["sglang"], seed=0,
        max_model_len=256, out_dir=str(out), enable_sleep=True,
    )
    yield actor, sparrow, sections, out
    ray.shutdown()


def _trainer(policy, sent, actor, sections) -> SimpleNamespace:
    """What `broadcast_to_engines` reads of OpenRLHF's ActorPPOTrainer in colocated mode (use_cuda_ipc)."""
    sparrow = {**sections["sparrow"], "distill": SimpleNamespace(**sections["sparrow"]["distill"])}
    args = SimpleNamespace(sparrow=SimpleNamespace(**sparrow), sglang=SimpleNamespace(**sections["sglang"]),
                           ds=SimpleNamespace(zero_stage=2), vllm=SimpleNamespace(enable_prefix_caching=False))

    def openrlhf_ipc_broadcast():  # ppo_actor.py:439-466 up to the opened tensor: one call per parameter, in turn
        named = list(sent.named_parameters())
        for i, (n, p) in enumerate(named):
            ray.get(actor.receive_ipc_tensor.remote(n, p.data, i == len(named) - 1))

    return SimpleNamespace(use_cuda_ipc=True, strategy=SimpleNamespace(args=args), vllm_engines=[actor],
                           actor=SimpleNamespace(model=SimpleNamespace(module=policy)),
                           _openrlhf_broadcast_to_vllm=openrlhf_ipc_broadcast)


def _records(out) -> list[dict]:
    lines = (out / "trainer.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "weight_sync"]


def test_canary_runs_after_the_ipc_broadcast(engine, model_dir):
    actor, sparrow, sections, out = engine
    ray.get(actor.sleep.remote())
    ray.get(actor.wake_up.remote(["weights"]))  # OpenRLHF's colocated sync: the KV cache still sleeps
    policy = perturbed_policy(model_dir, seed=4)
    broadcast_to_engines(_trainer(policy, policy, actor, sections))
    record = _records(out)[-1]
    assert record["path"] == "cuda_ipc" and record["canary_max_abs_diff"] < 1e-4
    assert record["tensors"] == sum(1 for _ in policy.parameters())


def test_ipc_canary_mismatch_raises(engine, model_dir):
    actor, sparrow, sections, out = engine
    trained, stale = perturbed_policy(model_dir, seed=5), perturbed_policy(model_dir, seed=6)
    with pytest.raises(SyncError, match="after the cuda_ipc weight sync .* does not serve the trained weights"):
        broadcast_to_engines(_trainer(trained, stale, actor, sections))  # the engine got other weights
    assert _records(out)[-1]["canary_max_abs_diff"] > 0.05
