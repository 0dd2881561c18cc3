"""`sparrow serve --dense`: the stock-backend SGLang baseline (same page size, dtype, pool), and weight reloads.

The baseline must equal transformers (so does the sparrow backend with a dense schedule, test_sglang_server.py), so
engine-vs-trainer drift is never mistaken for sparsity-induced mismatch. A weight reload must flush the prefix cache:
the canary right after it reflects the new weights even though its prompt was cached before. A dense server refuses
a sparse per-request schedule, and the inputs that crash SGLang's own stock backend (issue 15) get a 400.
"""

from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("sglang")

from sparrow_sgl.engine import SamplingParams  # noqa: E402
from sparrow_sgl.sglang.client import CANARY_PROMPT, SGLangError, SGLangRolloutClient  # noqa: E402
from sparrow_sgl.sglang.serve import ServerSpec, start  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

LOGPROB_ATOL = 2e-4
PROMPTS = [list(range(30, 130)), list(range(300, 380))]


@pytest.fixture(scope="module")
def models(tiny_model_factory):
    return tiny_model_factory(seed=3), tiny_model_factory(seed=4)


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("sglang-dense") / "server.log"
    server = start(ServerSpec(model=str(models[0]), dense=True, port=port, kv_tokens=4096), log_path=log)
    yield SGLangRolloutClient(server.url, timeout=300)
    server.stop()


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    tokens = out[0, len(prompt) :].tolist()
    with torch.no_grad():
        logits = model(out).logits[0, len(prompt) - 1 : -1]
    return tokens, torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_dense_baseline_equals_transformers(client, models):
    hf = _hf(models[0])
    rollouts = client.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True))
    for prompt, r in zip(PROMPTS, rollouts):
        tokens, logprobs = _greedy(hf, prompt, 30)
        assert r.token_ids == tokens
        torch.testing.assert_close(torch.tensor(r.logprobs), logprobs, atol=LOGPROB_ATOL, rtol=0)
        assert r.meta["schedule"] == "dense (stock backend)" and r.meta["kv_tokens_mean"] is None


def test_weight_reload_flushes_the_cache_and_the_canary_follows(client, models):
    base = client.canary()
    other = client.update_weights_from_disk(str(models[1]))
    expect_tokens, expect_logprobs = _greedy(_hf(models[1]), CANARY_PROMPT, len(other.token_ids))
    assert other.token_ids == expect_tokens
    torch.testing.assert_close(torch.tensor(other.logprobs), expect_logprobs, atol=LOGPROB_ATOL, rtol=0)
    back = client.update_weights_from_disk(str(models[0]))
    assert back.token_ids == base.token_ids
    torch.testing.assert_close(torch.tensor(back.logprobs), torch.tensor(base.logprobs), atol=1e-6, rtol=0)


def test_dense_server_refuses_sparse_schedules_and_survives_sglang_crashing_inputs(client):
    with pytest.raises(SGLangError) as err:
        client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2), schedule="fixed:64")
    assert err.value.status == 400 and "decodes densely" in str(err.value)
    (r,) = client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, ignore_eos=True), schedule="dense")
    assert len(r.token_ids) == 2
    # without the plugin's check these kill the stock backend's scheduler (logits processor / embedding IndexError)
    for prompt in ({"text": ""}, {"input_ids": [1, 2, 99999]}, {"input_ids": [1, -5]}):
        with pytest.raises(SGLangError) as err:
            client.post("/generate", {**prompt, "sampling_params": {"max_new_tokens": 2}})
        assert err.value.status == 400
    assert len(client.canary().token_ids) == 16
