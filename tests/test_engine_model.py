"""The engine's Qwen3 equals transformers' on the same weights: prefill, cached-prefix prefill and step decode."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import hf_model, make_engine, random_prompts

from sparrow_sgl.config import ConfigError
from sparrow_sgl.engine.sequence import Sequence, SequenceGroup


def _prefill_logits(engine, prompt: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits at every prompt position, prefilling the prompt in pieces (the later pieces see a cached prefix)."""
    seq = Sequence(10_000, prompt, params=None, max_new_tokens=1)
    group = SequenceGroup([seq])
    (seq.block_table,), _ = engine.block_manager.allocate_group(len(prompt), 1, len(prompt))
    sparsity = engine.config.sparsity()
    out, start = [], 0
    try:
        with torch.inference_mode():
            for n in chunks:
                hidden = engine.runner.prefill([seq], [prompt[start : start + n]], sparsity)
                out.append(engine.model.compute_logits(hidden))
                start += n
                seq.num_cached = start
    finally:
        engine.block_manager.free(seq.block_table)
    assert group.n == 1
    return torch.cat(out).cpu()


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_prefill_logits_match_transformers(tiny_model_factory, kv_heads):
    model_dir = tiny_model_factory(num_attention_heads=4, num_key_value_heads=kv_heads)
    engine, hf = make_engine(model_dir), hf_model(model_dir)
    (prompt,) = random_prompts([37], seed=kv_heads)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(_prefill_logits(engine, prompt, [37]), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_prefill_logits(engine, prompt, [10, 1, 26]), ref, atol=1e-4, rtol=1e-4)
    assert engine.block_manager.num_used == 0


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("schedule", ["dense", "fixed:256"])
def test_step_decode_matches_transformers(tiny_model_factory, kv_heads, schedule):
    """Teacher-forced step-by-step decode (dense, or a budget >= the length) gives transformers' distributions."""
    model_dir = tiny_model_factory(num_attention_heads=4, num_key_value_heads=kv_heads)
    engine, hf = make_engine(model_dir), hf_model(model_dir)
    prompts = random_prompts([9, 22], seed=kv_heads)
    responses = random_prompts([30, 17], seed=kv_heads + 10)
    scores = engine.score(prompts, responses, sparse=schedule, return_full=True)
    for prompt, response, score in zip(prompts, responses, scores):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
        torch.testing.assert_close(score.full_logprobs, ref[len(prompt) - 1 : -1], atol=1e-4, rtol=1e-4)


def test_bfloat16_close_to_transformers(tiny_model_dir):
    engine, hf = make_engine(tiny_model_dir, dtype="bfloat16"), hf_model(tiny_model_dir, torch.bfloat16)
    assert engine.kv_cache.k.dtype == torch.bfloat16
    (prompt,) = random_prompts([20])
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    got = _prefill_logits(engine, prompt, [20])
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


def test_hf_parameter_names_match_transformers(tiny_model_factory):
    for tied in (True, False):
        model_dir = tiny_model_factory(tie_word_embeddings=tied)
        engine, hf = make_engine(model_dir), hf_model(model_dir)
        assert set(engine.model.hf_parameters()) == set(hf.state_dict())
        for name, tensor in hf.state_dict().items():
            torch.testing.assert_close(engine.model.hf_parameters()[name].cpu(), tensor, atol=0, rtol=0)


def test_bad_model_dir_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="model directory not found"):
        make_engine(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.json"):
        make_engine(tmp_path)
    other = tmp_path / "llama"
    other.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unsupported model.*LlamaForCausalLM"):
        make_engine(other)
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="no safetensors"):
        make_engine(empty)


def test_engine_config_validation():
    from sparrow_sgl.config import EngineConfig

    for bad in (
        {"device": "tpu"},
        {"dtype": "int8"},
        {"page_size": 0},
        {"kv_gb": 0},
        {"max_num_seqs": 0},
        {"scorer": "magic"},
        {"gpu_memory_fraction": 1.5},
    ):
        with pytest.raises(ConfigError):
            EngineConfig(model="m", **bad)


def test_sharded_checkpoint_loads(tiny_model_dir, tmp_path):
    hf = hf_model(tiny_model_dir)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert (tmp_path / "model.safetensors.index.json").is_file()
    engine = make_engine(tmp_path)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(engine.model.hf_parameters()[name].cpu(), tensor), name


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 1_000_000.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    ],
)
def test_rope_variants_match_transformers(tiny_model_dir, tmp_path, rope):
    for path in tiny_model_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    engine, hf = make_engine(tmp_path), hf_model(tmp_path)
    (prompt,) = random_prompts([90], seed=5)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(_prefill_logits(engine, prompt, [90]), ref, atol=1e-4, rtol=1e-4)
