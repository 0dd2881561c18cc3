"""The colocated CUDA-IPC weight sync on CPU. CUDA IPC itself needs CUDA, so the seam is the tensor just opened from
its handle: the engine side (staging, fail-closed apply) runs for real on the embedded engine, and the trainer
side runs sparrow's patched `broadcast_to_vllm` in colocated mode, either bucketed (ipc_buckets.py: the buckets are
planned, packed and sent for real, only the CUDA-IPC share is replaced by handing the packed buffer over) or with
OpenRLHF's IPC broadcast replaced by a stand-in that feeds each parameter through that seam: after it returns, the
canary must run and a mismatch raise."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("openrlhf")
ray = pytest.importorskip("ray")

from openrlhf_helpers import perturbed_policy  # noqa: E402

from sparrow_sgl.openrlhf import ipc_buckets  # noqa: E402
from sparrow_sgl.openrlhf.embedded_backend import EmbeddedBackend  # noqa: E402
from sparrow_sgl.openrlhf.flags import SGLangFlags, SparrowFlags, to_dict  # noqa: E402
from sparrow_sgl.openrlhf.ipc_sync import IpcReceiver, bucket_views  # noqa: E402
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


def _trainer(policy, sent, actor, sections, bucket_mb: float = 0.0) -> SimpleNamespace:
    """What `broadcast_to_engines` reads of OpenRLHF's ActorPPOTrainer in colocated mode (use_cuda_ipc); bucket_mb 0:
    OpenRLHF's per-parameter broadcast (the stand-in below), else sparrow's buckets of that size."""
    sparrow = {**sections["sparrow"], "distill": SimpleNamespace(**sections["sparrow"]["distill"]),
               "ipc_bucket_mb": bucket_mb}
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


def _params(*specs) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"p{i}", torch.nn.Parameter(torch.zeros(shape, dtype=dtype))) for i, (shape, dtype) in enumerate(specs)]


def test_buckets_hold_consecutive_parameters_of_one_dtype_up_to_the_cap():
    named = _params(((4, 8), torch.float32), ((8,), torch.float32), ((16, 16), torch.float32),
                    ((2,), torch.bfloat16), ((3,), torch.bfloat16), ((5,), torch.float32))
    buckets = ipc_buckets.plan_buckets(named, cap_bytes=200, zero3=False)
    # 32 + 8 floats = 160 B; the 256-float parameter is over the cap alone; a dtype change starts a bucket
    assert [[e.name for e in b.entries] for b in buckets] == [["p0", "p1"], ["p2"], ["p3", "p4"], ["p5"]]
    assert [(e.offset, e.numel) for e in buckets[0].entries] == [(0, 32), (32, 8)]
    assert [b.numel for b in buckets] == [40, 256, 5, 5]
    assert [b.dtype for b in buckets] == [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    flat = ipc_buckets.pack(buckets[0], torch.device("cpu"))
    named[0][1].data.fill_(1.0)  # pack copies: later changes of the parameter do not reach a packed buffer
    assert flat.shape == (40,) and float(flat.abs().sum()) == 0.0
    views = bucket_views(buckets[0].wire(), ipc_buckets.pack(buckets[0], torch.device("cpu")), "torch.float32")
    assert [(n, tuple(v.shape)) for n, v in views] == [("p0", (4, 8)), ("p1", (8,))] and float(views[0][1].sum()) == 32


@pytest.mark.parametrize("bad", ["dtype", "range", "numel"])
def test_a_malformed_bucket_is_refused_by_name(bad):
    entries = [{"name": "w", "shape": [2, 3], "offset": 0, "numel": 6}]
    flat, dtype = torch.zeros(6), "torch.float32"
    if bad == "dtype":
        dtype = "torch.bfloat16"
    elif bad == "range":
        entries[0]["offset"] = 1
    else:
        entries[0]["numel"] = 5
    with pytest.raises(SyncError, match="CUDA-IPC weight bucket"):
        bucket_views(entries, flat, dtype)


def _hand_over(actor):
    """The CUDA-IPC share replaced: the packed buffer itself goes to the engine's bucket seam."""
    def send(engines, bucket, flat, last):
        return [actor.receive_ipc_bucket.remote(bucket.wire(), flat.clone(), last, str(flat.dtype))]
    return send


def test_bucketed_ipc_sync_applies_at_its_last_bucket_and_checks_the_canary(engine, model_dir, monkeypatch):
    actor, sparrow, sections, out = engine
    monkeypatch.setattr(ipc_buckets, "send_over_cuda_ipc", _hand_over(actor))
    policy = perturbed_policy(model_dir, seed=7)
    broadcast_to_engines(_trainer(policy, policy, actor, sections, bucket_mb=0.05))  # 50 KiB: several buckets
    record = _records(out)[-1]
    assert record["path"] == "cuda_ipc" and record["canary_max_abs_diff"] < 1e-4
    assert 1 < record["buckets"] < record["tensors"] and record["transfer_seconds"] <= record["seconds"]


def test_a_bucket_that_fails_midway_leaves_the_old_weights(engine, model_dir, monkeypatch):
    actor, sparrow, sections, out = engine
    before = ray.get(actor.canary.remote())
    sent = []

    def send(engines, bucket, flat, last):
        entries = bucket.wire()
        if len(sent) == 2:
            entries[0]["numel"] += 1  # the third bucket is malformed
        sent.append(bucket)
        return [actor.receive_ipc_bucket.remote(entries, flat.clone(), last, str(flat.dtype))]

    monkeypatch.setattr(ipc_buckets, "send_over_cuda_ipc", send)
    with pytest.raises(SyncError, match="CUDA-IPC weight bucket"):
        broadcast_to_engines(_trainer(perturbed_policy(model_dir, seed=8), None, actor, sections, bucket_mb=0.05))
    assert len(sent) == 3 and ray.get(actor.canary.remote())["logprobs"] == before["logprobs"]
    monkeypatch.setattr(ipc_buckets, "send_over_cuda_ipc", _hand_over(actor))  # the next sync starts clean
    policy = perturbed_policy(model_dir, seed=9)
    broadcast_to_engines(_trainer(policy, policy, actor, sections, bucket_mb=0.05))
    assert _records(out)[-1]["canary_max_abs_diff"] < 1e-4
