"""`reward_func` called the way OpenRLHF calls it, and label parsing."""

import importlib.util
import json

import pytest
import torch

from rewards.labels import Label, parse_label
from rewards.openrlhf import response_of, reward_func

PROMPT = "<|im_start|>user\nWhat is 1/2 + 0?<|im_end|>\n<|im_start|>assistant\n"


def test_parse_label_formats():
    assert parse_label("42") == Label("math", answer="42")
    assert parse_label("[1, 2)") == Label("math", answer="[1, 2)")  # JSON-looking but not an object
    assert parse_label(json.dumps({"kind": "math", "answer": "\\frac12"})).answer == "\\frac12"
    lab = parse_label({"kind": "code", "tests": "assert True", "entry_point": "f"})
    assert (lab.kind, lab.entry_point) == ("code", "f")
    for bad, msg in [({"kind": "poetry"}, "kind must be one of"), ({"kind": "code"}, "needs 'tests'"),
                     ({"kind": "math"}, "needs an 'answer'"), (None, "label must be")]:
        with pytest.raises(ValueError, match=msg):
            parse_label(bad)


def test_response_of_strips_prompt_padding_and_special_tokens():
    query = "<|endoftext|><|endoftext|>" + PROMPT + "\\boxed{1/2}<|im_end|><|endoftext|>"
    assert response_of(query, PROMPT) == "\\boxed{1/2}"
    assert response_of("<|im_start|>assistant\nhello<|im_end|>", "not in there") == "\nhello"


def test_reward_func_shapes_and_values():
    code_label = json.dumps({"kind": "code", "tests": "def check(candidate):\n    assert candidate(3) == 4\n",
                             "entry_point": "inc"})
    io_label = json.dumps({"kind": "code", "tests": [{"input": "2\n", "output": "4\n"},
                                                     {"input": "3\n", "output": "9\n"}]})
    responses = ["<think>hmm</think>The answer is \\boxed{0.5}.", "\\boxed{2}",
                 "```python\ndef inc(x):\n    return x + 1\n```", "```python\nprint(int(input()) * 2)\n```",
                 "The answer is 7"]
    labels = ["\\frac{1}{2}", json.dumps({"kind": "math", "answer": "3"}), code_label, io_label,
              json.dumps({"kind": "math", "answer": "Janet pays 3 + 4 = 7\n#### 7"})]
    prompts = [PROMPT] * len(responses)
    queries = [p + r + "<|im_end|>" for p, r in zip(prompts, responses)]
    out = reward_func(queries, prompts, labels)  # positional, as OpenRLHF calls it
    assert set(out) == {"rewards", "scores", "extra_logs"}
    for key in ("rewards", "scores"):
        assert isinstance(out[key], torch.Tensor) and out[key].dtype == torch.float32 and out[key].shape == (5,)
    assert out["rewards"].tolist() == pytest.approx([1.0, 0.0, 1.0, 0.5, 1.0])
    assert torch.equal(out["rewards"], out["scores"])
    for name, value in out["extra_logs"].items():  # OpenRLHF concatenates and splits them along the batch
        assert isinstance(value, torch.Tensor) and value.shape == (5,), name
    assert out["extra_logs"]["is_code"].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert reward_func(queries[:1], prompts[:1], labels[:1], metas=None)["rewards"].shape == (1,)


def test_reward_func_loads_from_a_file_path():
    """OpenRLHF imports the file by path (importlib.util.spec_from_file_location), not as a package module."""
    import rewards.openrlhf as mod

    spec = importlib.util.spec_from_file_location("reward_func", mod.__file__)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    out = loaded.reward_func([PROMPT + "\\boxed{3}"], [PROMPT], ["3"])
    assert out["rewards"].tolist() == [1.0]


def test_reward_func_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        reward_func(["a", "b"], ["a"], ["1", "2"])
