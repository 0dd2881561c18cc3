"""Every code test format, run in the sandbox: correct passes, wrong fails, empty programs score 0; the false
passes of issue 14; the standard import block; hidden-input and tolerance rules end to end."""

import json

import pytest

from rewards import code
from rewards.labels import score_labeled
from rewards.sandbox import SandboxConfig, run_program


def _fence(body: str) -> str:
    return f"```python\n{body}\n```"


TACO_CALL = json.dumps({"fn_name": "add", "inputs": [[1, 2], [3, 4], [-1, 1]], "outputs": [[3], [7], [0]]})
TACO_STDIO = json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]})
LCB_FUNCTIONAL = [{"input": "1\n2", "output": "3", "testtype": "functional"},
                  {"input": "3\n4", "output": "7", "testtype": "functional"}]
LCB_STDIN = json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
                        {"input": "3 4\n", "output": "7\n", "testtype": "stdin"}])
CODECONTESTS = {"public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
                "private_tests": {"input": ["3 4\n"], "output": ["7\n"]},
                "generated_tests": {"input": ["-1 1\n"], "output": ["0\n"]}}
MBPP = {"test_list": ["assert add(1, 2) == 3", "assert add(3, 4) == 7"], "test_setup_code": "", "test_imports": []}
HUMANEVAL = {"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(3, 4) == 7\n",
             "entry_point": "add"}
PYTEST = ("from solution import add\n\ndef test_small():\n    assert add(1, 2) == 3\n\n"
          "def test_big():\n    assert add(3, 4) == 7\n")
ASSERTS = "assert add(1, 2) == 3\nassert add(3, 4) == 7\n"
STDIO = [{"input": "1 2\n", "output": "3\n"}, {"input": "3 4\n", "output": "7\n"}]

ADD_FN = "def add(a, b):\n    return a + b\n"
ADD_CLASS = "class Solution:\n    def add(self, a: int, b: int) -> int:\n        return a + b\n"
ADD_STDIN = "a, b = map(int, input().split())\nprint(a + b)\n"
# format name -> (label fields, correct program, wrong program)
FORMATS = {
    "taco call": ({"tests": TACO_CALL}, ADD_FN, ADD_FN.replace("+", "*")),
    "apps class Solution": ({"tests": TACO_CALL, "format": "apps"}, ADD_CLASS, ADD_CLASS.replace("+", "-")),
    "taco stdio": ({"tests": TACO_STDIO}, ADD_STDIN, ADD_STDIN.replace("+", "*")),
    "livecodebench functional": ({"tests": json.dumps(LCB_FUNCTIONAL), "fn_name": "add"}, ADD_CLASS,
                                 ADD_CLASS.replace("+", "*")),
    "livecodebench stdin": ({"tests": LCB_STDIN}, ADD_STDIN, ADD_STDIN.replace("+", "-")),
    "codecontests": ({"tests": CODECONTESTS}, ADD_STDIN, ADD_STDIN.replace("+", "*")),
    "mbpp": ({"tests": MBPP}, ADD_FN, ADD_FN.replace("+", "*")),
    "humaneval": ({"tests": HUMANEVAL}, ADD_FN, ADD_FN.replace("+", "*")),
    "pytest": ({"tests": PYTEST}, ADD_FN, ADD_FN.replace("+", "*")),
    "asserts": ({"tests": ASSERTS}, ADD_FN, ADD_FN.replace("+", "*")),
    "stdio": ({"tests": STDIO}, ADD_STDIN, ADD_STDIN.replace("+", "*")),
}
NOTHING = {"empty": "", "pass only": "pass", "prints nothing": "import sys\nsys.stdin.read()\n",
           "prints the question back": "print(input())\n"}


def test_every_format_correct_wrong_and_empty_programs():
    labels, responses, expected = [], [], []
    for name, (fields, right, wrong) in FORMATS.items():
        label = {"kind": "code", **fields}
        for what, program, want in [("correct", right, 1.0), ("wrong", wrong, 0.0),
                                    *[(k, v, 0.0) for k, v in NOTHING.items()]]:
            labels.append(label)
            responses.append(_fence(program))
            expected.append((name, what, want))
    scored = score_labeled(responses, labels, workers=4)
    wrong = [(name, what, s.score, s.reason) for (name, what, want), s in zip(expected, scored) if s.score != want]
    assert not wrong, wrong
    assert all(s.error is None for s in scored)


@pytest.mark.parametrize("program", ["", "pass", "def add(a, b):\n    pass\n", "import sys\nsys.exit(0)\n"])
def test_false_passes_of_issue_14_score_zero(program):
    """Each of these scored 1.0 before: the input_output JSON string ran as Python code with no assertion."""
    assert code.score(_fence(program), TACO_CALL) == 0.0
    assert code.score(_fence(program), TACO_STDIO) == 0.0
    # pytest-style test functions used to be defined and never called
    assert code.score(_fence(program), PYTEST) == 0.0
    assert code.score(_fence(program), "def test_small():\n    assert add(1, 2) == 3\n") == 0.0


def test_false_pass_test_code_that_cannot_fail_is_a_value_error():
    with pytest.raises(ValueError, match="never call"):  # HumanEval test without entry_point: scored 1.0 before
        code.score(_fence("pass"), HUMANEVAL["test"])
    with pytest.raises(ValueError, match="cannot fail"):  # no assertion at all: scored 1.0 before
        code.score(_fence("pass"), "import math\nprint(add(1, 2))\n")
    scored = score_labeled([_fence("pass")], [{"kind": "code", "tests": HUMANEVAL["test"]}])
    assert scored[0].score == 0.0 and "never call" in scored[0].error


def test_call_based_details():
    # tuples are lists, the TACO one-element wrapper is unwrapped, floats within tolerance, dict keys as strings
    tests = {"fn_name": "f", "inputs": [[1], [2], [3]], "outputs": [[[1, 2]], [0.30000001], {"1": "a"}]}
    program = "def f(x):\n    return [(1, 2), 0.1 + 0.2, {1: 'a'}][x - 1]\n"
    details = code.score_with_details(_fence(program), tests)
    assert (details.passed, details.format) == (3, "taco")
    assert code.score(_fence(program.replace("0.1 + 0.2", "0.3001")), tests) == pytest.approx(2 / 3)
    # a case that raises or times out fails alone; a program without the function fails all
    tests = {"fn_name": "f", "inputs": [[0], [1], [2]], "outputs": [0, 1, 2]}
    assert code.score(_fence("def f(x):\n    return 1 // x * 0 + x\n"), tests) == pytest.approx(2 / 3)
    assert code.score(_fence("def g(x):\n    return x\n"), tests) == 0.0
    # the main block does not run for call-based tests, and stdin is empty
    assert code.score(_fence("def f(x):\n    return x\nif __name__ == '__main__':\n    input()\n"), tests) == 1.0


def test_standard_import_block():
    programs = [("def f(xs: List[int]) -> int:\n    return reduce(gcd, xs)\n", 2),
                ("def f(xs):\n    h = list(xs)\n    heapify(h)\n    return heappop(h) + bisect_left(sorted(xs), 5)"
                 " + len(Counter(xs)) + floor(sqrt(16)) + len(list(accumulate(xs)))\n", 4 + 1 + 2 + 4 + 2),
                ("from __future__ import annotations\n\ndef f(xs: list[int]) -> int:\n    return min(xs)\n", 4)]
    for program, value in programs:
        assert code.score(_fence(program), {"fn_name": "f", "inputs": [[[4, 6]]], "outputs": [value]}) == 1.0, program
    stdin = "n = int(sys.stdin.readline())\nprint(comb(n, 2), ascii_lowercase[:n])\n"
    assert code.score(_fence(stdin), [{"input": "3\n", "output": "3 abc\n"}]) == 1.0
    # the block's names are not the program's: `add` from `operator` is not a solution to an `add` problem
    assert code.score(_fence("x = 1"), TACO_CALL) == 0.0
    assert code.score(_fence("x = 1"), ASSERTS) == 0.0


def test_strict_stdout_option():
    tests = [{"input": "", "output": "2.500000\n"}]
    assert code.score(_fence("print(2.5)"), tests) == 1.0
    assert code.score(_fence("print(2.5)"), tests, strict=True) == 0.0
    assert code.score(_fence("print('2.500000')"), tests, strict=True) == 1.0
    scored = score_labeled([_fence("print(2.5)")], [{"kind": "code", "tests": tests, "strict": True}])
    assert scored[0].score == 0.0


def test_numpy_in_the_sandbox_when_its_interpreter_has_it():
    if run_program("import numpy", config=SandboxConfig(timeout_s=20)).status != "ok":
        pytest.skip(f"the sandbox interpreter {SandboxConfig().python} has no numpy (set SPARROW_SANDBOX_PYTHON)")
    program = "def f(xs):\n    return np.array(xs).sum()\n"
    assert code.score(_fence(program), {"fn_name": "f", "inputs": [[[1, 2]]], "outputs": [3]}) == 1.0
    tests = ("import numpy as np\nfrom solution import f\n\n"
             "def test_a():\n    assert (f([1, 2]) == np.array([2, 4])).all()\n\n"
             "def test_b():\n    np.testing.assert_array_equal(f([3]), np.array([6]))\n\n"
             "def test_c():\n    assert f([1])[0] == 2\n")
    right = "import numpy as np\ndef f(xs):\n    return np.array(xs) * 2\n"
    assert code.score(_fence(right), tests) == 1.0
    assert code.score(_fence(right.replace("* 2", "* 3")), tests) == 0.0
    patched = "import numpy as np\nnp.testing.assert_array_equal = lambda *a, **k: None\n" + right.replace("* 2", "* 3")
    assert code.score(_fence(patched), tests) == 0.0


def test_sandbox_python_selection(monkeypatch, tmp_path):
    from rewards import sandbox

    monkeypatch.setenv("SPARROW_SANDBOX_PYTHON", "/usr/bin/env")
    assert SandboxConfig().python == "/usr/bin/env"
    monkeypatch.delenv("SPARROW_SANDBOX_PYTHON")
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    (hidden / "python").write_text("")
    (hidden / "python").chmod(0o755)
    assert not sandbox._world_usable(str(hidden / "python"))
    hidden.chmod(0o755)
    assert sandbox._world_usable(str(hidden / "python")) == all(
        p.stat().st_mode & 0o001 for p in [tmp_path, *tmp_path.parents])
    assert not sandbox._usable_by_sandbox([str(hidden / "python")])  # /tmp is a private tmpfs in the sandbox
    assert SandboxConfig().python in (sandbox._this_python_with_numpy(), "/usr/bin/python3",
                                      "/usr/local/bin/python3", __import__("sys").executable)


STACK_TESTS = '''import pytest
from solution import Stack

@pytest.fixture
def stack():
    s = Stack()
    s.push(1)
    yield s

@pytest.fixture
def full(stack):
    stack.push(2)
    return stack

def test_pop(stack):
    assert stack.pop() == 1

def test_full(full):
    assert full.pop() == 2

@pytest.mark.parametrize("x", [3, 4])
def test_push(stack, x):
    stack.push(x)
    assert stack.pop() == x

class TestStack:
    @pytest.fixture
    def empty(self):
        return Stack()

    def test_empty(self, empty):
        with pytest.raises(IndexError):
            empty.pop()
'''
STACK = ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
         "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n")


def test_pytest_fixtures_parametrize_and_test_classes():
    """KodCode-style tests: fixtures (plain, generator, depending on another, on a test class) are resolved by
    parameter name, parametrize runs every row; a test that reaches the program only through a fixture counts."""
    details = code.score_with_details(_fence(STACK), STACK_TESTS)
    assert (details.score, details.total, details.format) == (1.0, 4, "pytest")
    assert code.score(_fence(STACK.replace("items.pop()", "items.pop(0)")), STACK_TESTS) == 0.5
    assert code.score(_fence("pass"), STACK_TESTS) == 0.0


def test_value_asserts_compare_with_python_equality_outside_the_sandbox():
    tests = ("import math\nassert f(1) == (1, 2)\nassert f(2) == {1: 'a'}\nassert {3} == f(3)\nx = 4\n"
             "assert f(x) == b'x'\nassert f(5) == 1.5\nassert f(6) == 2\n")
    right = "def f(x):\n    return {1: (1, 2), 2: {1: 'a'}, 3: {3}, 4: b'x', 5: 1.5, 6: 2.0}[x]\n"
    details = code.score_with_details(_fence(right), tests)
    assert (details.score, details.total) == (1.0, 6)  # 2.0 == 2 as in Python
    assert code.score(_fence(right.replace("(1, 2)", "[1, 2]")), tests) == pytest.approx(5 / 6)  # a list != a tuple
    assert code.score(_fence(right.replace("1.5", "1.5000001")), tests) == pytest.approx(5 / 6)  # exact, as ==
    # a value that is not data (a class of the program's) fails its case only
    assert code.score(_fence(right.replace("b'x'", "object()")), tests) == pytest.approx(5 / 6)
