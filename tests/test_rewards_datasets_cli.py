"""Prompt sets, prompt formatting, and the `sparrow reward` command."""

import json

import pytest

from rewards import datasets as ds
from rewards.cli import add_arguments, run


def test_bundled_sets_load_with_prompt_and_label():
    gsm = ds.load_gsm8k()
    assert len(gsm) == 1319 and json.loads(gsm[0]["label"]) == {"kind": "math", "answer": "18"}
    assert gsm[0]["prompt"] == gsm[0]["question"] and "####" in gsm[0]["answer"]
    math500 = ds.load_math500()
    assert len(math500) == 500 and json.loads(math500[0]["label"])["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    he = ds.load_humaneval()
    label = json.loads(he[0]["label"])
    assert len(he) == 164 and label["kind"] == "code" and label["entry_point"] == "has_close_elements"
    assert he[0]["original_prompt"] in he[0]["prompt"]
    for sub in ("gsm8k", "math500", "humaneval"):
        assert (ds.DATA_DIR / sub / "LICENSE").is_file()


def test_paths_and_errors(tmp_path):
    path = tmp_path / "pl.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "label": {"kind": "math", "answer": "2"}}) + "\n")
    rows = ds.load_prompt_label(path)
    assert json.loads(rows[0]["label"])["answer"] == "2"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="lacks field"):
        ds.load_prompt_label(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="bundled: test only"):
        ds.load_gsm8k("train")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["2+2?"], "answer": ["#### 4"]}), tmp_path / "g.parquet")
    assert json.loads(ds.load_gsm8k(path=tmp_path / "g.parquet")[0]["label"])["answer"] == "4"


class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kw):
        self.calls.append(kw)
        think = "" if kw.get("enable_thinking", True) else "<think>\n\n</think>\n\n"
        return f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n{think}"


def test_format_prompt_chat_template_and_fallback():
    tok = _ChatTokenizer()
    off = ds.format_prompt(tok, "What is 2+2?", thinking=False)
    assert off.endswith("<think>\n\n</think>\n\n") and "\\boxed{}" in off
    assert tok.calls[-1] == {"enable_thinking": False}
    ds.format_prompt(tok, "q", thinking=None)
    assert tok.calls[-1] == {}
    plain = ds.format_prompt(None, "What is 2+2?")
    assert plain.startswith("Question: What is 2+2?") and plain.endswith("Answer:") and "\\boxed{}" in plain
    formatted = ds.with_chat_prompts(ds.load_math500().select(range(2)), tok, thinking=True)
    assert formatted[0]["prompt"].startswith("<|im_start|>user") and formatted[0]["question_text"]


def test_format_prompt_with_a_real_qwen3_style_template():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
                         "{% endif %}{% endif %}")
    assert ds.format_prompt(tok, "q", thinking=False).endswith("<think>\n\n</think>\n\n")
    assert ds.format_prompt(tok, "q", thinking=True).endswith("<|im_start|>assistant\n")


def _args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_math_and_code(tmp_path, capsys):
    rollouts = tmp_path / "r.jsonl"
    rows = [{"response": "\\boxed{18}", "reference": "#### 18"}, {"response": "The answer is 3", "answer": "4"},
            {"response": "```python\nprint(input())\n```", "tests": [{"input": "a", "output": "a"}]},
            {"response": "x", "label": json.dumps({"kind": "math", "answer": "x"})}]
    rollouts.write_text("\n".join(json.dumps(r) for r in rows))
    assert run(_args("--file", str(rollouts), "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["items"] == 4 and out["accuracy"] == 0.75
    assert [i["score"] for i in out["per_item"]] == [1.0, 0.0, 1.0, 1.0]
    assert run(_args("--file", str(rollouts))) == 0
    text = capsys.readouterr().out
    assert "accuracy: 75.0% (3/4 items)" in text and " s" in text


def test_cli_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"response": "1"}) + "\n")
    assert run(_args("--file", str(bad))) == 2
    assert "no 'label', 'reference'" in capsys.readouterr().err


def test_sparrow_reward_subcommand_is_wired(tmp_path, capsys):
    from sparrow_sgl.cli import main

    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(json.dumps({"response": "\\boxed{2}", "label": "2"}) + "\n")
    assert main(["reward", "--kind", "math", "--file", str(rollouts), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
