"""Code test formats parse into one TestSet (no program runs here); output and value comparison rules."""

import json

import pytest

from rewards.code_formats import parse_tests
from rewards.compare import outputs_match, tokens_match, values_match

TACO_CALL = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [[3], [7]]}


@pytest.mark.parametrize("tests", [TACO_CALL, json.dumps(TACO_CALL), {"input_output": json.dumps(TACO_CALL)}])
def test_taco_call_based_as_dict_json_or_row(tests):
    ts = parse_tests(tests)
    assert (ts.kind, ts.format, ts.fn_name, ts.total, ts.unwrap_single) == ("call", "taco", "add", 2, True)
    assert ts.cases[0].args == [1, 2] and ts.cases[0].expected == [3]


def test_taco_json_string_is_never_python_code():
    """The false pass of issue 14: an input_output JSON string used to run as (assert-free) Python test code."""
    assert parse_tests(json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})).kind == "stdio"
    assert parse_tests(json.dumps(TACO_CALL), format="apps").format == "apps"


def test_taco_stdio_lines_and_int_keys():
    ts = parse_tests({"inputs": [["1 2", "3"]], "outputs": [["3", "3"]]})
    assert (ts.cases[0].input, ts.cases[0].output) == ("1 2\n3", "3\n3")
    call = parse_tests({"fn_name": "f", "inputs": [[{"1": "a"}]], "outputs": [{"2": "b"}]})
    assert call.cases[0].args == [{1: "a"}] and call.cases[0].expected == {2: "b"}
    assert parse_tests(TACO_CALL, fn_name="other").fn_name == "other"


def test_livecodebench_functional_and_stdin():
    cases = [{"input": "[1, 2]\n3", "output": "true", "testtype": "functional"}]
    ts = parse_tests(json.dumps(cases), fn_name="hasPair")
    assert (ts.kind, ts.fn_name, ts.cases[0].args, ts.cases[0].expected) == ("call", "hasPair", [[1, 2], 3], True)
    row = {"public_test_cases": json.dumps(cases), "private_test_cases": "", "metadata": '{"func_name": "g"}'}
    assert parse_tests(row).fn_name == "g"
    stdin = parse_tests([{"input": "1", "output": "2", "testtype": "stdin"}])
    assert (stdin.kind, stdin.format) == ("stdio", "livecodebench")
    with pytest.raises(ValueError, match="fn_name"):
        parse_tests(cases)  # functional without fn_name
    with pytest.raises(ValueError, match="mixes"):
        parse_tests([*cases, {"input": "1", "output": "2", "testtype": "stdin"}], fn_name="f")


def test_livecodebench_evaluation_sample_in_taco_shape():
    """LiveCodeBench's get_evaluation_sample(): input_output with fn_name and JSON-lines string inputs."""
    sample = {"input_output": json.dumps({"inputs": ["[1, 2]\n3"], "outputs": ["true"], "fn_name": "hasPair"})}
    ts = parse_tests(sample)
    assert (ts.kind, ts.cases[0].args, ts.cases[0].expected, ts.unwrap_single) == ("call", [[1, 2], 3], True, False)


def test_livecodebench_pickled_private_tests_refuse_objects():
    import base64
    import pickle
    import zlib

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    payload = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(ValueError, match="refusing"):
        parse_tests({"public_test_cases": "[]", "private_test_cases": payload})


def test_codecontests_mbpp_humaneval_pytest():
    cc = parse_tests({"public_tests": {"input": ["1\n"], "output": ["1\n"]},
                      "private_tests": {"input": ["2\n"], "output": ["4\n"]}, "generated_tests": None})
    assert (cc.kind, cc.format, cc.total) == ("stdio", "codecontests", 2)
    mbpp = parse_tests({"test_list": ["assert f(1) == 1", "assert f(2) == 4"], "test_setup_code": "",
                        "test_imports": ["import math"]})
    assert (mbpp.kind, mbpp.format, mbpp.total) == ("values", "mbpp", 2)  # every test is `assert expr == literal`
    assert [(c.expr, c.expected) for c in mbpp.cases] == [("f(1)", 1), ("f(2)", 4)]
    he = parse_tests({"test": "def check(candidate):\n    assert candidate(1) == 1\n", "entry_point": "f"})
    assert (he.format, he.total) == ("humaneval", 1) and he.code.rstrip().endswith("check(f)")
    py = parse_tests("from solution import f\n\ndef test_a():\n    assert f(1) == 1\n\nclass TestB:\n"
                     "    def test_c(self):\n        assert f(2) == 2\n\ndef helper():\n    assert f(3) == 3\n")
    assert (py.format, py.test_functions) == ("pytest", ["test_a", "TestB.test_c"])
    plain = parse_tests("import math\nx = 2\nassert f(x) == 4\nfor i in range(3):\n    assert f(i) >= 0\n")
    assert (plain.kind, plain.format, plain.test_statements) == ("code", "asserts", [2, 3])
    assert parse_tests(["assert f(1) == 1"], format="mbpp").total == 1  # test_list alone
    kodcode_row = {"question": "q", "test": "from solution import f\ndef test_a():\n    assert f(1) == 1\n"}
    assert parse_tests(kodcode_row).format == "pytest"
    assert parse_tests("def check(c):\n    assert c(1) == 1\n", format="humaneval", entry_point="f").total == 1


@pytest.mark.parametrize("tests, kw, match", [
    ("import math\nx = f(1)\n", {}, "cannot fail"),  # no assert
    ("def check(candidate):\n    assert candidate(1) == 1\n", {}, "never call"),  # check without entry_point
    ("from solution import f\ndef helper():\n    assert f(1) == 1\n", {}, "cannot fail"),  # nothing is called
    ("assert True\nassert 1 + 1 == 2\n", {}, "cannot fail"),  # asserts that do not read the program
    ("def f(x):\n    return x\nassert f(1) == 1\n", {}, "cannot fail"),  # the tests define what they test
    ("if __name__ == '__main__':\n    assert f(1) == 1\n", {}, "cannot fail"),  # never runs
    ([], {}, "no test cases"),
    ("[]", {}, "no test cases"),
    ({"inputs": [], "outputs": []}, {}, "no test cases"),
    (json.dumps({"fn_name": "f", "inputs": [], "outputs": []}), {}, "no test cases"),
    ({"public_tests": {"input": [], "output": []}}, {}, "no test cases"),
    ({"test_list": []}, {}, "cannot fail"),
    ([{"input": "1", "output": "  \n"}], {}, "empty output"),
    ({"fn_name": "f", "inputs": [[1]], "outputs": [[None]]}, {}, "expects None"),
    ({"inputs": [[1]], "outputs": [[1], [2]]}, {}, "1 inputs but 2 outputs"),
    ({"fn_name": "f(); import os", "inputs": [[1]], "outputs": [1]}, {}, "identifier"),
    ({"whatever": 1}, {}, "unrecognised"),
    ("assert f(1) == 1", {"format": "bogus"}, "format must be"),
    ("print(1)", {"format": "codecontests"}, "must be a dict"),
    ("[1, 2]", {"format": "taco"}, "must be a dict"),
    ("assert f(1) == 1", {"format": "livecodebench"}, "list of cases"),
    ({"test_list": "assert f(1) == 1"}, {}, "list of assert strings"),
    ("assert (", {}, "not valid Python"),
])
def test_tests_that_cannot_fail_or_cannot_be_read_are_value_errors(tests, kw, match):
    with pytest.raises(ValueError, match=match):
        parse_tests(tests, **kw)


def test_output_comparison_is_lenient_like_taco_and_livecodebench():
    assert outputs_match("  3  \n", "3")  # leading/trailing whitespace on a line
    assert outputs_match("\n\n3\n4\n\n", "3\n4")  # blank first and last lines
    assert outputs_match("1    2\t3\n", "1 2 3\n")  # runs of spaces between tokens
    assert outputs_match("2.5\n", "2.500000\n") and outputs_match("0.3333333333333333", "0.333333")  # floats
    assert outputs_match("a\r\nb\r\n", "a\nb\n")  # CRLF
    assert outputs_match("1e3", "1000.0") and tokens_match("-0.0", "0")


def test_output_comparison_keeps_what_must_stay_wrong():
    assert not outputs_match("", "3")  # nothing printed
    assert not outputs_match("3 4", "3\n4")  # line structure counts
    assert not outputs_match("3\n\n4", "3\n4")  # a blank line in between counts
    assert not outputs_match("50000000000000001", "50000000000000000")  # integers are exact
    assert not outputs_match("2.50001", "2.5")  # beyond 1e-6
    assert not outputs_match("nan", "nan0") and not tokens_match("inf", "1e400")
    assert not outputs_match("YES", "yes")  # case counts
    assert not outputs_match("3 4 5", "3 4")


def test_strict_comparison():
    assert outputs_match("a b\r\n", "a b\n", strict=True) and outputs_match("a b", "a b\n\n", strict=True)
    assert not outputs_match(" a b", "a b", strict=True) and not outputs_match("2.5", "2.500000", strict=True)


def test_value_comparison():
    assert values_match([1, 2], [1, 2]) and values_match(0.1 + 0.2, 0.3) and values_match(3, 3.0)
    assert values_match({"1": [1.0000000001]}, {1: [1]})
    assert values_match(5, [5], unwrap_single=True) and not values_match(5, [5])
    assert not values_match(5, [5, 6], unwrap_single=True)  # only a one-element wrapper is unwrapped
    assert not values_match(True, 1) and not values_match(None, 0) and not values_match("1", 1)
    assert not values_match([1, 2], [2, 1]) and not values_match(10**17 + 1, 10**17)
