"""Prompt sets, prompt formatting, and the `sparrow reward` command."""

import json
from pathlib import Path

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


@pytest.mark.parametrize("flag", [["--limit", "-1"], ["--limit", "0"], ["--workers", "0"], ["--timeout", "0"],
                                  ["--show", "-2"], ["--limit", "x"]])
def test_cli_out_of_range_numbers_are_refused(tmp_path, capsys, flag):
    """--limit -1 used to score all rows but the last one, silently."""
    from sparrow_sgl.cli import main

    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(json.dumps({"response": "\\boxed{2}", "label": "2"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["reward", "--file", str(rollouts), *flag])
    assert exit_.value.code == 2 and flag[0] in capsys.readouterr().err


def test_sparrow_reward_subcommand_is_wired(tmp_path, capsys):
    from sparrow_sgl.cli import main

    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(json.dumps({"response": "\\boxed{2}", "label": "2"}) + "\n")
    assert main(["reward", "--kind", "math", "--file", str(rollouts), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0


# --- code datasets as they ship, per-item errors ------------------------------------------------------------------

CODE_DATA = Path(__file__).parent / "data" / "code"
CODE_FILES = {"taco": "taco.jsonl", "apps": "apps.jsonl", "livecodebench": "livecodebench.jsonl",
              "codecontests": "codecontests.parquet", "mbpp": "mbpp.jsonl", "kodcode": "kodcode.jsonl"}


def _code_sets():
    return {name: ds.load_code_dataset(CODE_DATA / file) for name, file in CODE_FILES.items()}


def test_code_loaders_keep_fields_and_build_labels():
    sets = _code_sets()
    assert {name: len(rows) for name, rows in sets.items()} == {
        "taco": 4, "apps": 2, "livecodebench": 2, "codecontests": 2, "mbpp": 3, "kodcode": 2}
    taco = sets["taco"]
    assert json.loads(taco[2]["label"])["format"] == "taco" and "def sum_of_squares" in taco[2]["prompt"]
    assert "standard input" in taco[0]["prompt"] and taco[0]["source"] == "codeforces"
    lcb = json.loads(sets["livecodebench"][1]["label"])
    assert lcb["fn_name"] == "countPairs" and len(lcb["tests"]) == 2  # public + decoded private
    assert len(json.loads(sets["livecodebench"][0]["label"])["tests"]) == 3
    cc = sets["codecontests"][0]
    assert cc["name"] == "1000_A. Divide" and cc["time_limit"] == {"seconds": 1, "nanos": 0}
    public_only = ds.load_codecontests(CODE_DATA / "codecontests.parquet", splits=["public_tests"])
    assert list(json.loads(public_only[0]["label"])["tests"]) == ["public_tests"]
    mbpp = sets["mbpp"][0]
    assert "assert square_list([1, 2, 3]) == [1, 4, 9]" in mbpp["prompt"] and mbpp["task_id"] == 1
    sanitized = ds.load_mbpp(CODE_DATA / "mbpp_sanitized.jsonl")
    assert json.loads(sanitized[0]["label"])["tests"]["test_imports"] == ["import math"]
    assert sanitized[0]["original_prompt"] in sanitized[0]["prompt"]
    assert "module `solution`" in sets["kodcode"][0]["prompt"]
    for name, file in CODE_FILES.items():
        assert len(getattr(ds, f"load_{name}")(CODE_DATA / file)) == len(sets[name])


def test_code_loaders_drop_or_raise_on_tests_that_cannot_fail(tmp_path):
    rows = [{"question": "q", "input_output": json.dumps({"inputs": ["1"], "outputs": ["1"]})},
            {"question": "empty", "input_output": json.dumps({"inputs": [], "outputs": []})},
            {"question": "no fn", "input_output": json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [None]})}]
    path = tmp_path / "taco.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="dropped 2 row"):
        assert len(ds.load_taco(path)) == 1
    with pytest.raises(ValueError, match="row 1: .*no test cases"):
        ds.load_taco(path, skip_invalid=False)
    with pytest.raises(ValueError, match="cannot tell"):
        ds.load_code_dataset(CODE_DATA / "responses.jsonl")
    with pytest.raises(ValueError, match="splits"):
        ds.load_codecontests(CODE_DATA / "codecontests.parquet", splits=["train"])


def test_shipped_examples_score_as_recorded():
    """Every response of responses.jsonl gets its recorded score, and the datasets' own solutions fields pass."""
    from rewards.labels import score_labeled

    sets = _code_sets()
    rows = [json.loads(line) for line in (CODE_DATA / "responses.jsonl").read_text().splitlines()]
    responses = [r["response"] for r in rows]
    labels = [sets[r["dataset"]][r["row"]]["label"] for r in rows]
    own = []  # (label, program, must pass)
    for name in ("taco", "apps"):
        own += [(row["label"], sol, True) for row in sets[name] for sol in json.loads(row["solutions"])]
    for row in sets["codecontests"]:
        own += [(row["label"], sol, True) for lang, sol in zip(row["solutions"]["language"],
                                                              row["solutions"]["solution"]) if lang == 3]
        own += [(row["label"], sol, False) for sol in row["incorrect_solutions"]["solution"]]
    own += [(row["label"], row["code"], True) for row in sets["mbpp"]]
    own += [(row["label"], row["solution"], True) for row in sets["kodcode"]]
    fence = "```python\n{}\n```".format
    scored = score_labeled(responses + [fence(p) for _, p, _ in own], labels + [lab for lab, _, _ in own], workers=4)
    got = [(r["dataset"], r["row"], r["score"], s.score) for r, s in zip(rows, scored)]
    assert all(abs(want - score) < 1e-9 for _, _, want, score in got), got
    for (_, program, must_pass), s in zip(own, scored[len(rows):]):
        assert (s.score == 1.0) == must_pass, (program, s.reason)


def test_score_labeled_gives_a_bad_item_zero_and_its_reason():
    from rewards.labels import score_labeled

    labels = [{"kind": "code", "tests": json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [2]})},
              {"kind": "code", "tests": "def check(candidate):\n    assert candidate(1) == 2\n"},  # no entry_point
              {"kind": "code", "tests": []}, {"kind": "code"}, {"kind": "poetry"}, "2",
              {"kind": "code", "tests": "assert f(1) == 2", "timeout_s": -1}]
    responses = ["```python\ndef f(x):\n    return 2 * x\n```"] * 5 + ["\\boxed{2}", "x"]
    scored = score_labeled(responses, labels, workers=2)
    assert [s.score for s in scored] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert [s.error is None for s in scored] == [True, False, False, False, False, True, False]
    assert "never call" in scored[1].error and "no test cases" in scored[2].error
    assert "needs 'tests'" in scored[3].error and "kind must be" in scored[4].error
    assert scored[1].kind == "code" and scored[1].reason.startswith("invalid label")
    with pytest.raises(ValueError, match="responses but"):
        score_labeled(["a"], [])


def test_cli_shows_reasons_and_counts_invalid_labels(tmp_path, capsys):
    rollouts = tmp_path / "r.jsonl"
    rows = [{"response": "```python\ndef add(a, b):\n    return a + b\n```",
             "tests": json.dumps({"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]})},
            {"response": "```python\npass\n```", "tests": "def check(candidate):\n    assert candidate(1)\n"},
            {"response": "```python\nprint(1)\n```", "label": json.dumps({"kind": "code", "tests": []})},
            {"response": "```python\nprint(2)\n```", "tests": [{"input": "", "output": "2"}], "strict": True}]
    rollouts.write_text("\n".join(json.dumps(r) for r in rows))
    assert run(_args("--file", str(rollouts), "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["items"], out["invalid_labels"], out["errors"]) == (4, 2, 2)
    assert [i["score"] for i in out["per_item"]] == [1.0, 0.0, 0.0, 1.0]
    assert "never call" in out["per_item"][1]["error"] and out["per_item"][0]["error"] is None
    assert run(_args("--file", str(rollouts))) == 0
    captured = capsys.readouterr()
    assert "invalid labels: 2 items" in captured.out and "invalid label" in captured.out
    assert "item 3: invalid label: no test cases" in captured.err  # items numbered from 1
