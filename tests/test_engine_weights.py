"""Weight updates in place and peft LoRA adapters merged for rollout only."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import hf_model, make_engine, random_prompts

from sparrow_sgl.config import ConfigError
from sparrow_sgl.engine import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)



def _dense_logprobs(engine, prompts, responses):
    return [s.full_logprobs for s in engine.score(prompts, responses, return_full=True)]


def _hf_logprobs(model, prompts, responses):
    out = []
    for p, r in zip(prompts, responses):
        with torch.no_grad():
            out.append(model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1].float().log_softmax(-1))
    return out


def _perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if "proj" in k else v.clone() for k, v in state.items()}


def _save_adapter(model_dir, path, r=4, alpha=16, **kw):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(hf_model(model_dir), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: make the adapter do something
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(path)
    return peft_model.merge_and_unload()


def test_update_weights_changes_output_and_restores(tiny_model_dir):
    engine, hf = make_engine(tiny_model_dir), hf_model(tiny_model_dir)
    prompts = random_prompts([9, 14], seed=20)
    base = engine.generate(prompts, GREEDY, progress=False)
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    new = _perturbed(original)
    engine.update_weights(new)  # a mapping
    changed = engine.generate(prompts, GREEDY, progress=False)
    assert [r.token_ids for r in changed] != [r.token_ids for r in base]
    hf.load_state_dict(new)
    responses = [r.token_ids for r in changed]
    for got, ref in zip(_dense_logprobs(engine, prompts, responses), _hf_logprobs(hf, prompts, responses)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    engine.update_weights(iter(original.items()))  # an iterator of pairs
    again = engine.generate(prompts, GREEDY, progress=False)
    assert [r.token_ids for r in again] == [r.token_ids for r in base]
    assert [r.logprobs for r in again] == [r.logprobs for r in base]
    with pytest.raises(ConfigError, match="unknown parameter"):
        engine.update_weights({"model.layers.0.nonsense.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="shape"):
        engine.update_weights({"model.norm.weight": torch.zeros(3)})


@pytest.mark.parametrize("use_rslora", [False, True])
def test_set_adapter_matches_peft_merge_and_none_restores(tiny_model_dir, tmp_path, use_rslora):
    engine = make_engine(tiny_model_dir)
    prompts = random_prompts([10, 6], seed=21)
    base_params = {k: v.clone() for k, v in engine.model.hf_parameters().items()}
    base = engine.generate(prompts, GREEDY, progress=False)
    merged = _save_adapter(tiny_model_dir, tmp_path / "adapter", use_rslora=use_rslora)

    engine.set_adapter(tmp_path / "adapter")
    assert engine.adapter_path == str(tmp_path / "adapter")
    adapted = engine.generate(prompts, GREEDY, progress=False)
    assert [r.token_ids for r in adapted] != [r.token_ids for r in base]
    responses = [r.token_ids for r in adapted]
    for got, ref in zip(_dense_logprobs(engine, prompts, responses), _hf_logprobs(merged, prompts, responses)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    engine.set_adapter(None)
    for name, tensor in engine.model.hf_parameters().items():
        assert torch.equal(tensor, base_params[name]), name
    restored = engine.generate(prompts, GREEDY, progress=False)
    assert [r.logprobs for r in restored] == [r.logprobs for r in base]


def test_update_weights_with_active_adapter_remerges(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir)
    _save_adapter(tiny_model_dir, tmp_path / "adapter")
    hf = hf_model(tiny_model_dir)
    new = _perturbed(hf.state_dict())
    engine.set_adapter(tmp_path / "adapter")
    engine.update_weights(new)
    # served = new base + adapter delta: the same as loading the adapter on top of the new weights
    reference = make_engine(tiny_model_dir)
    reference.update_weights(new)
    reference.set_adapter(tmp_path / "adapter")
    for name, tensor in reference.model.hf_parameters().items():
        torch.testing.assert_close(engine.model.hf_parameters()[name], tensor, atol=1e-6, rtol=0)
    engine.set_adapter(None)
    for name, tensor in new.items():
        assert torch.equal(engine.model.hf_parameters()[name].cpu(), tensor), name


def test_bad_adapter_errors(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir)
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        engine.set_adapter(tmp_path)
    _save_adapter(tiny_model_dir, tmp_path / "ok")
    cfg = (tmp_path / "ok" / "adapter_config.json").read_text()
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(cfg.replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ConfigError, match="DoRA"):
        engine.set_adapter(tmp_path / "dora")
    assert engine.adapter_path is None
