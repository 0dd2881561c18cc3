"""A real SGLang server (CPU, tiny Qwen3) with the sparrow backend plugin, started once for the module.

Tolerances: SGLang's dense path is torch_native SDPA, the embedded engine and transformers use their own attention
code, all float32; greedy tokens must be equal and log-probs agree to LOGPROB_ATOL.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("sglang")

from sparrow_sgl.config import EngineConfig  # noqa: E402
from sparrow_sgl.engine import Engine, SamplingParams  # noqa: E402
from sparrow_sgl.sglang.client import SGLangError, SGLangRolloutClient  # noqa: E402
from sparrow_sgl.sglang.serve import ServerSpec, start  # noqa: E402
from sparrow_sgl.tiny import TinyModelSpec  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(900)]

LOGPROB_ATOL = 2e-4
SPARSE = "fixed:64"  # 4 pages: with ~100-token prompts and 100 new tokens selection drops most pages
PROMPTS = [list(range(30, 130)), [7, 8, 9] * 30 + list(range(200, 220)), list(range(300, 380))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    # larger init than the default so greedy decoding does not collapse onto one repeated token
    return tiny_model_factory(hidden_size=128, intermediate_size=256, seed=3)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("sglang") / "server.log"
    spec = ServerSpec(
        model=str(model_dir), schedule=SPARSE, port=_free_port(), kv_tokens=8192, enable_lora=True, max_lora_rank=8
    )
    srv = start(spec, log_path=log, timeout=600)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    return SGLangRolloutClient(server.url, timeout=300)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(EngineConfig(model=str(model_dir), kv_gb=0.05))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_generate_returns_logprobs_topk_and_sparse_meta(client):
    params = SamplingParams(temperature=1.0, max_new_tokens=40, logprobs_topk=5, seed=7, n=2, ignore_eos=True)
    rollouts = client.generate(PROMPTS[:2], params)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rollouts:
        assert len(r.token_ids) == len(r.logprobs) == len(r.topk_ids) == 40
        assert all(len(k) == 5 for k in r.topk_ids)
        assert all(a >= b for row in r.topk_logprobs for a, b in zip(row, row[1:]))  # sorted descending
        assert r.meta["schedule"] == SPARSE  # the server default
        assert r.meta["kv_tokens_mean"] <= 64  # selection really drops pages (contexts are 100-160 tokens)
        assert r.finish_reason == "length"


def test_dense_schedule_equals_transformers_greedy_and_logprobs(client, hf_model):
    rollouts = client.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=40), schedule="dense")
    for prompt, r in zip(PROMPTS, rollouts):
        assert r.meta["schedule"] == "dense"
        ids = torch.tensor([prompt])
        expect = hf_model.generate(ids, max_new_tokens=40, do_sample=False, attention_mask=torch.ones_like(ids))
        assert r.token_ids == expect[0, len(prompt) :].tolist()
        expect = _hf_logprobs(hf_model, prompt, r.token_ids)
        torch.testing.assert_close(torch.tensor(r.logprobs), expect, atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_those_of_the_tempered_distribution(client, hf_model, temperature):
    params = SamplingParams(temperature=temperature, max_new_tokens=30, seed=11)
    (r,) = client.generate(PROMPTS[:1], params, schedule="dense")
    expect = _hf_logprobs(hf_model, PROMPTS[0], r.token_ids, temperature)
    torch.testing.assert_close(torch.tensor(r.logprobs), expect, atol=LOGPROB_ATOL, rtol=0)


def test_sparse_greedy_equals_embedded_engine(client, engine):
    params = SamplingParams(temperature=0.0, max_new_tokens=100, ignore_eos=True)
    ours = client.generate(PROMPTS, params, schedule=SPARSE)
    theirs = engine.generate(PROMPTS, params, schedule=SPARSE, progress=False)
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=LOGPROB_ATOL, rtol=0)
        assert a.meta["kv_tokens_mean"] == pytest.approx(b.meta["kv_tokens_mean"], rel=1e-6)
        assert a.meta["kv_tokens_mean"] < len(a.prompt_ids) + len(a.token_ids) / 2  # pages really dropped


def test_sparse_sampled_logprobs_equal_engine_sparse_scoring(client, engine):
    """Sampled (T=1) SGLang rollouts, teacher-forced through the engine's sparse decode: same selection, same log-p."""
    ours = client.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=80, seed=5, ignore_eos=True))
    scores = engine.score([r.prompt_ids for r in ours], [r.token_ids for r in ours], sparse=engine_schedule())
    dense = engine.score([r.prompt_ids for r in ours], [r.token_ids for r in ours])
    for r, s, d in zip(ours, scores, dense):
        torch.testing.assert_close(torch.tensor(r.logprobs), s.logprobs, atol=LOGPROB_ATOL, rtol=0)
        assert (s.logprobs - d.logprobs).abs().max() > 10 * LOGPROB_ATOL  # sparsity is visible: not the dense run


def test_dense_teacher_forced_scoring_equals_transformers(client, hf_model):
    rollouts = client.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=30, seed=2, ignore_eos=True))
    scores = client.score([r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts], topk=5)
    for r, s in zip(rollouts, scores):
        expect = _hf_logprobs(hf_model, r.prompt_ids, r.token_ids)
        torch.testing.assert_close(s.logprobs, expect, atol=LOGPROB_ATOL, rtol=0)
        with torch.no_grad():
            logits = hf_model(torch.tensor([r.prompt_ids + r.token_ids])).logits[0, len(r.prompt_ids) - 1 : -1]
        top = torch.log_softmax(logits.float(), -1).topk(5, dim=-1)
        assert torch.equal(s.topk_ids, top.indices)
        torch.testing.assert_close(s.topk_logprobs, top.values, atol=LOGPROB_ATOL, rtol=0)


def engine_schedule():
    from sparrow_sgl.schedule import resolve_schedule

    return resolve_schedule(SPARSE)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("no-such-preset", "unknown schedule"),
        ("fixed:50", "not a multiple of the page size"),
        ({"budgets": [64], "dense_layers": [0]}, "may change the budgets only"),
        ('{"budgets": [64]', "not valid JSON"),
    ],
)
def test_malformed_requests_get_400_and_server_keeps_serving(client, schedule, message):
    with pytest.raises(SGLangError) as err:
        client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2), schedule=schedule)
    assert err.value.status == 400 and message in str(err.value)
    (r,) = client.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True))
    assert len(r.token_ids) == 3


def test_prompt_longer_than_context_is_a_4xx(client):
    with pytest.raises(SGLangError) as err:
        client.generate([[5] * 9000], SamplingParams(max_new_tokens=2))
    assert 400 <= err.value.status < 500 and "context length" in str(err.value)


def test_per_request_schedule_json_object(client):
    schedule = {"budgets": [None, 48], "bin_tokens": 128, "name": "grow"}
    (r,) = client.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=60), schedule=schedule)
    assert r.meta["schedule"] == "grow"
    assert 48 < r.meta["kv_tokens_mean"] < 160  # dense below 128 tokens, 48 above


def test_64_concurrent_requests_all_complete(server):
    client = SGLangRolloutClient(server.url, timeout=600, max_concurrency=64)
    prompts = [list(range(i, i + 24)) for i in range(64)]
    rollouts = client.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True))
    assert len(rollouts) == 64 and all(len(r.token_ids) == 16 for r in rollouts)


def test_lora_load_changes_output_equals_merged_model_and_unload_restores(client, model_dir, hf_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = client.canary()
    peft_model = get_peft_model(
        _fresh_hf(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().eval()

    loaded = client.load_lora(str(tmp_path / "adapter"))
    assert loaded.token_ids != base.token_ids or loaded.logprobs != base.logprobs
    params = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
    (r,) = client.generate(PROMPTS[:1], params, schedule="dense")  # the adapter is the default: not named here
    assert r.meta["lora"] == "rollout"
    expect = _hf_logprobs(merged, PROMPTS[0], r.token_ids)
    torch.testing.assert_close(torch.tensor(r.logprobs), expect, atol=LOGPROB_ATOL, rtol=0)
    ids = torch.tensor([PROMPTS[0]])
    assert r.token_ids == merged.generate(ids, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(ids))[
        0, len(PROMPTS[0]) :
    ].tolist()

    restored = client.unload_lora()
    assert restored.token_ids == base.token_ids
    torch.testing.assert_close(torch.tensor(restored.logprobs), torch.tensor(base.logprobs), atol=1e-6, rtol=0)


def _fresh_hf(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_tiny_spec_is_big_enough_for_sparsity():
    # the sparse tests need >= 4 layers: layers 0 and 1 stay dense
    assert TinyModelSpec().num_hidden_layers >= 4


def test_concurrent_bad_and_good_requests(client):
    def one(i):
        schedule = "fixed:50" if i % 2 else SPARSE
        try:
            return client.generate([[i + 1] * 20], SamplingParams(max_new_tokens=4), schedule=schedule)[0]
        except SGLangError as e:
            return e.status

    results = list(ThreadPoolExecutor(8).map(one, range(16)))
    assert [r for r in results[1::2]] == [400] * 8
    assert all(len(r.token_ids) == 4 or r.finish_reason == "stop" for r in results[0::2])


def _tensor_payload(obj) -> list[str]:
    import base64
    import pickle

    return [base64.b64encode(pickle.dumps(obj)).decode()]


Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"
LORA_CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA"}
BAD_LORA_TENSORS = [
    ("not-a-pickle", ["bm90IGEgcGlja2xl"]),
    ("bucket-not-a-pickle", (["bm90IGEgcGlja2xl"], {"load_format": "flattened_bucket"})),
    ("bucket-a-dict", (_tensor_payload({"x": torch.zeros(2)}), {"load_format": "flattened_bucket"})),
    ("checksum-mismatch", (_tensor_payload({"x": torch.zeros(2)}), {"expected_checksums": {"x": "0" * 64}})),
    ("a-list", _tensor_payload([("x", torch.zeros(2))])),
    ("wrong-shape", _tensor_payload({f"{Q_PROJ}.lora_A.weight": torch.zeros(3, 3), f"{Q_PROJ}.lora_B.weight":
                                     torch.zeros(3, 3)})),
]


@pytest.mark.parametrize("case, payload", BAD_LORA_TENSORS, ids=[c for c, _ in BAD_LORA_TENSORS])
def test_bad_lora_tensors_are_refused_and_the_server_keeps_serving(client, case, payload):
    """/load_lora_adapter_from_tensors with an unreadable or ill-shaped adapter: a one-line 4xx, the base model's
    greedy canary unchanged (with --enable-lora, DistillSparse's servers)."""
    payload, extra = payload if isinstance(payload, tuple) else (payload, {})
    base = client.canary()
    with pytest.raises(SGLangError) as err:
        client.post("/load_lora_adapter_from_tensors", {"lora_name": f"bad-{case}", "config_dict": LORA_CONFIG,
                                                          "serialized_named_tensors": payload, **extra})
    assert 400 <= err.value.status < 500 and "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert client.canary().token_ids == base.token_ids
