"""Code reward: program extraction, assert and stdin/stdout tests, HumanEval canonical solutions."""

import gzip
import json
from pathlib import Path

import pytest

from rewards import code
from rewards.labels import score_labeled
from rewards.text import extract_code

HUMANEVAL = Path(code.__file__).parent / "data" / "humaneval" / "HumanEval.jsonl.gz"


def _fence(body: str, tag: str = "python") -> str:
    return f"```{tag}\n{body}\n```"


def test_extract_code_prefers_last_python_block():
    text = f"<think>{_fence('print(0)')}</think>intro {_fence('print(1)')} {_fence('x', 'text')} {_fence('print(2)')}"
    assert extract_code(text).strip() == "print(2)"
    assert extract_code(f"a {_fence('ls', 'bash')} b").strip() == "ls"
    assert extract_code("print(3)") == "print(3)\n"


def test_asserts_are_separate_tests():
    response = _fence("def add(a, b):\n    return a + b if a < 5 else 0")
    tests = "import math\nassert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(7, 1) == 8\n"
    details = code.score_with_details(response, tests)
    assert (details.passed, details.total) == (2, 3) and details.score == pytest.approx(2 / 3)


def test_check_candidate_with_entry_point():
    tests = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
    assert code.score(_fence("def sq(x):\n    return x * x"), tests, entry_point="sq") == 1.0
    assert code.score(_fence("def sq(x):\n    return x + x"), tests, entry_point="sq") == 0.0
    # a completion-style response (function body only) is put after the prefix
    assert code.score("    return x * x\n", tests, entry_point="sq", prefix="def sq(x):\n") == 1.0


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "exit()",
                                       "raise SystemExit"])
def test_early_exit_passes_nothing(exit_call):
    assert code.score(_fence(f"def f():\n    return 1\n{exit_call}"), "assert f() == 2\nassert True\n") == 0.0


def test_forged_report_without_token_does_not_count():
    program = "import os\nfor i in range(3):\n    os.write(1, f'deadbeef {i} 1\\n'.encode())\nos._exit(0)"
    assert code.score(_fence(program), "assert f() == 1\nassert f() == 2\n") == 0.0


def test_main_block_does_not_run_under_asserts():
    program = "def f():\n    return 1\nif __name__ == '__main__':\n    input()\n"
    assert code.score(_fence(program), "assert f() == 1") == 1.0


def test_stdin_stdout_cases():
    program = _fence("a, b = map(int, input().split())\nprint(a + b)   \nprint()\n")
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2", "output": "4"},
             {"input": "5 5\r\n", "output": "10  \r\n\r\n"}, {"input": "1 1", "output": "3"}]
    details = code.score_with_details(program, cases)
    assert (details.passed, details.total) == (3, 4)


def test_timeouts_and_crashes_score_zero():
    assert code.score(_fence("def f():\n    return 1\nwhile True: pass"), "assert f() == 1", timeout_s=1.0) == 0.0
    assert code.score(_fence("def f(:"), "assert f() == 1") == 0.0
    assert code.score(_fence("while True: pass"), [{"input": "", "output": "x"}], timeout_s=1.0) == 0.0


def test_bad_tests_are_named():
    with pytest.raises(ValueError, match="not valid Python"):
        code.score("pass", "assert (")
    with pytest.raises(ValueError, match="'input' and 'output'"):
        code.score("pass", [{"input": "1"}])
    with pytest.raises(ValueError, match="no test cases"):
        code.score("pass", [])
    with pytest.raises(ValueError, match="identifier"):
        code.score("pass", "assert True", entry_point="f(); import os")


def test_every_humaneval_canonical_solution_passes_and_a_wrong_one_fails():
    rows = [json.loads(line) for line in gzip.open(HUMANEVAL, "rt")]
    assert len(rows) == 164
    labels = [{"kind": "code", "tests": r["test"], "entry_point": r["entry_point"]} for r in rows]
    right = [_fence(r["prompt"] + r["canonical_solution"]) for r in rows]
    wrong = [_fence(r["prompt"] + "    return None\n") for r in rows]
    scored = score_labeled(right + wrong, labels + labels, workers=4, code_timeout_s=20)
    failed = [(rows[i]["task_id"], s.reason) for i, s in enumerate(scored[:164]) if s.score != 1.0]
    assert not failed, failed[:5]
    passed = [(rows[i]["task_id"], s.reason) for i, s in enumerate(scored[164:]) if s.score != 0.0]
    assert not passed, passed[:5]
