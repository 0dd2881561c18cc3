"""`reward_func` called the way OpenRLHF calls it, and label parsing."""

import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from rewards.labels import Label, parse_label
from rewards.openrlhf import response_of, reward_func

PROMPT = "<|im_start|>user\nWhat is 1/2 + 0?<|im_end|>\n<|im_start|>assistant\n"


def test_parse_label_formats():
    assert parse_label("42") == Label("math", answer="42")
    assert parse_label("[1, 2)") == Label("math", answer="[1, 2)")  # JSON-looking but not an object
    assert parse_label(json.dumps({"kind": "math", "answer": "\\frac12"})).answer == "\\frac12"
    lab = parse_label({"kind": "code", "tests": "assert f(1) == 2", "entry_point": "f"})
    assert (lab.kind, lab.entry_point) == ("code", "f")
    assert parse_label(lab) is lab  # a parsed label is not parsed again (reward_func parses each label once)
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


def test_bad_labels_score_zero_with_reward_error(caplog, monkeypatch):
    import rewards.openrlhf as mod

    monkeypatch.setattr(mod, "_warn", mod._RateLimitedWarning(60.0))  # fresh: earlier tests may have logged
    cannot_fail = json.dumps({"kind": "code", "tests": "print('hello')"})  # no assertion: an error, not a reward
    labels = [json.dumps({"kind": "poetry"}), json.dumps({"kind": "math"}), None, cannot_fail, "3"]
    queries = [PROMPT + "\\boxed{3}"] * len(labels)
    with caplog.at_level("WARNING", logger="rewards.openrlhf"):
        out = reward_func(queries, [PROMPT] * len(labels), labels)
    assert out["rewards"].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert out["extra_logs"]["reward_error"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert out["extra_logs"]["reward_error_label"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # the reason, as numbers
    assert out["extra_logs"]["reward_error_score"].tolist() == [0.0] * 5
    assert out["extra_logs"]["reward_error_input"].tolist() == [0.0] * 5
    for value in out["extra_logs"].values():  # OpenRLHF reduces each with value.flatten()[0].item()
        assert isinstance(value.flatten()[0].item(), float)
    messages = [r.getMessage() for r in caplog.records if r.name == "rewards.openrlhf"]
    assert len(messages) == 1 and "reward_error=1" in messages[0]  # one line per interval: the first reason
    mod._warn._last = float("-inf")  # the interval has passed: the next line counts the suppressed failures
    reward_func(queries[:1], [PROMPT], labels[:1])
    assert "+3 more failures" in caplog.records[-1].getMessage()


def test_empty_and_cut_json_labels_are_label_errors():
    """An empty label (OpenRLHF passes "" without --data.label_key) or a JSON object cut short scored 0 silently,
    as if the response were wrong, with no reward_error to show that every sample is unscorable."""
    labels = ["", "  ", json.dumps({"kind": "math", "answer": ""}), '{"kind": "math", "answer": "3"',
              '{"kind": "code", "tests": [{"input": "1\\n"', "{1, 2}", "3"]
    out = reward_func([PROMPT + "\\boxed{3}"] * len(labels), [PROMPT] * len(labels), labels)
    assert out["rewards"].tolist() == [0.0] * 6 + [1.0]
    assert out["extra_logs"]["reward_error_label"].tolist() == [1.0] * 5 + [0.0, 0.0]  # "{1, 2}": a set answer


def test_mismatched_lengths_and_crashing_scorers_do_not_raise(monkeypatch):
    out = reward_func(["a", "b"], ["a"], ["1", "2"])
    assert out["rewards"].tolist() == [0.0, 0.0] and out["extra_logs"]["reward_error"].tolist() == [1.0, 1.0]
    assert out["extra_logs"]["reward_error_input"].tolist() == [1.0, 1.0]
    import rewards.openrlhf as mod

    def boom(*args, **kwargs):
        raise RuntimeError("scorer crashed")

    monkeypatch.setattr(mod, "score_labeled", boom)
    out = reward_func([PROMPT + "\\boxed{3}"], [PROMPT], ["3"])
    assert out["rewards"].tolist() == [0.0] and out["extra_logs"]["reward_error"].tolist() == [1.0]
    assert out["extra_logs"]["reward_error_score"].tolist() == [1.0]


def test_response_of_a_left_truncated_prompt():
    long_prompt = "<|im_start|>user\n" + "blah " * 50 + "What is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    query = long_prompt[-40:] + "\\boxed{4}<|im_end|>"  # OpenRLHF kept only the prompt's last tokens
    assert response_of(query, long_prompt) == "\\boxed{4}"
    assert response_of("\ufffd" + query, long_prompt) == "\\boxed{4}"  # a multi-byte character cut in half


def test_concurrent_batch_one_calls_overlap_in_the_pool(monkeypatch, tmp_path):
    """Eight threads call with one sample each, as OpenRLHF does; the verifier waits until another item is being
    verified at the same time, which a serialized pool could never satisfy."""
    import rewards.openrlhf as mod
    from rewards.math import MathScorer
    from rewards.pool import KillablePool

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    monkeypatch.setenv("SPARROW_PROBE_DIR", str(tmp_path))
    scorer = MathScorer(workers=4, timeout_s=300, shortcut=False)
    scorer.pool = KillablePool("reward_probe:slow_verify", 4)
    monkeypatch.setattr(mod, "_scorer", scorer)
    reasons = []
    monkeypatch.setattr(mod, "score_labeled", _spy(mod.score_labeled, reasons))
    answers = [str(i) for i in range(8)]
    try:
        with ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(lambda a: reward_func([PROMPT + f"\\boxed{{{a}}}"], [PROMPT], [a]), answers))
    finally:
        scorer.close()
    assert [o["rewards"].tolist() for o in outs] == [[1.0]] * 8
    assert len(reasons) == 8 and all(r.endswith("rendezvous=met") for r in reasons), reasons


def _spy(fn, reasons):
    def wrapped(*args, **kwargs):
        scored = fn(*args, **kwargs)
        reasons.extend(s.reason for s in scored)
        return scored
    return wrapped


def test_pool_serves_concurrent_callers_and_still_kills_overruns(monkeypatch, tmp_path):
    """Eight threads map one item each on a 4-worker pool: each of the first four items waits until four items run
    at once (proof of overlap), and a hanging item in a ninth thread is killed at its timeout while they run."""
    from rewards.pool import KillablePool

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    (tmp_path / "meet").mkdir()
    (tmp_path / "hang").mkdir()
    results, hung = [None] * 8, []
    with KillablePool("reward_probe:rendezvous", workers=5) as pool:
        def call(i: int) -> None:
            results[i] = pool.map([(str(tmp_path / "meet"), 4, 120.0)], 300, lambda _: "timeout", lambda _, m: m)[0]

        def hang() -> None:
            hung.extend(pool.map([(str(tmp_path / "hang"), 2, 600.0)], 3, lambda _: "timeout", lambda _, m: m))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)] + [threading.Thread(target=hang)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert pool.map([(str(tmp_path / "meet"), 1, 1.0)], 60, lambda _: "timeout", lambda _, m: m)[0][1]
    assert all(r is not None and r[1] for r in results), results  # every item met the rendezvous of four
    assert len({pid for pid, _ in results}) >= 4
    assert hung == ["timeout"]


def test_pool_close_fails_waiting_maps_and_a_broken_target_raises(monkeypatch, tmp_path):
    from rewards.pool import KillablePool

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    pool = KillablePool("reward_probe:rendezvous", workers=1)
    errors = []

    def hang() -> None:
        try:
            pool.map([(str(tmp_path), 2, 600.0)], 600, lambda _: "timeout", lambda _, m: m)
        except RuntimeError as e:
            errors.append(str(e))

    waiter = threading.Thread(target=hang)
    waiter.start()
    while not any(tmp_path.iterdir()):  # the item is running in its worker
        waiter.join(0.05)
    pool.close()
    waiter.join()
    assert errors and "closed" in errors[0]
    assert pool.map([(str(tmp_path), 1, 1.0)], 60, lambda _: "timeout", lambda _, m: m)[0][1]  # restarts
    pool.close()
    with KillablePool("no_such_module_here:f", workers=2) as broken, pytest.raises(RuntimeError, match="did not start"):
        broken.map([1, 2, 3], 10, lambda _: "timeout", lambda _, m: m)
