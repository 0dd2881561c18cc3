"""Code test sets as the datasets ship them, parsed into one normalized `TestSet` before any program runs.

Formats (`format=` names; detected from the shape when not given; a dict or its JSON string):
- "taco" / "apps": `{"inputs": [...], "outputs": [...], "fn_name": optional}` (the `input_output` field; a row
  with `input_output` is accepted too). With `fn_name` the cases are calls: `inputs[i]` is the argument list
  (or, as LiveCodeBench's evaluation samples have it, a string of newline-separated JSON arguments with a JSON
  output); else stdin/stdout (a list of lines is joined with newlines).
- "livecodebench": `[{"input", "output", "testtype": "stdin" | "functional"}]` (or a row with
  `public_test_cases` / `private_test_cases` / `metadata`). Functional inputs are newline-separated JSON
  arguments and the output is JSON; `fn_name` comes from the metadata's `func_name`.
- "codecontests": `{"public_tests": {"input": [...], "output": [...]}, "private_tests": ..., "generated_tests": ...}`.
- "mbpp": `{"test_list": [assert ...], "test_setup_code": str, "test_imports": [str]}`.
- "humaneval": `{"test": code defining check(candidate), "entry_point": name}`, or test code + `entry_point=`.
- "pytest": code with top-level `def test_*` functions (or `class Test*` with `test_*` methods), KodCode style
  (`from solution import f`): each test function is one test.
- "asserts": plain Python test code; every top-level statement holding an `assert` or `raise` is one test, as
  is a top-level `check(...)` call (`rewards.python_tests` says what counts).
- "stdio": `[{"input": str, "output": str}]`.

A test set that cannot fail is a ValueError: no cases; test code with no assert, no check call and no test
function; `def check(` never called and no `entry_point`; stdin cases that all expect empty output; call cases
that all expect `None`.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.python_tests import analyze

FORMATS = ("taco", "apps", "livecodebench", "codecontests", "mbpp", "humaneval", "pytest", "asserts", "stdio")
CODECONTESTS_SPLITS = ("public_tests", "private_tests", "generated_tests")


@dataclass(slots=True)
class StdioCase:
    input: str
    output: str


@dataclass(slots=True)
class CallCase:
    args: list
    expected: Any


@dataclass(slots=True)
class ValueCase:
    index: int  # of the assert statement in the test code's top level
    expr: str  # evaluated in the sandbox
    expected: Any  # the literal, compared here


@dataclass(slots=True)
class TestSet:
    """What to run: `kind` "stdio" (cases), "call" (cases + fn_name), "code" (test code + test statements and
    functions) or "values" (test code whose test statements are `assert <expression> == <literal>`: one
    `ValueCase` per statement)."""

    kind: str
    format: str
    cases: list = field(default_factory=list)
    fn_name: str | None = None
    unwrap_single: bool = False  # TACO/APPS: a value may also equal expected[0]
    code: str = ""
    test_statements: list[int] = field(default_factory=list)  # indices into the top level of `code`
    test_functions: list[str] = field(default_factory=list)  # "test_x" or "TestC.test_y", called after `code`

    @property
    def total(self) -> int:
        if self.kind == "code":
            return len(self.test_statements) + len(self.test_functions)  # "values": one case per statement
        return len(self.cases)


def parse_tests(tests: Any, *, fn_name: str | None = None, entry_point: str | None = None,
                format: str | None = None) -> TestSet:
    """A validated `TestSet` from `tests` in any supported format (module docstring); ValueError when it cannot
    be parsed or cannot fail."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    data = _decoded(tests)
    fmt = format or _detect(data, entry_point)
    if fmt in _DICT_FORMATS and not isinstance(data, Mapping):
        raise ValueError(f"{fmt} tests must be a dict (or its JSON string), got {type(data).__name__} {data!r:.60}")
    return _PARSERS[fmt](data, fn_name=fn_name, entry_point=entry_point, fmt=fmt)


def _decoded(tests: Any) -> Any:
    """A JSON string of a dict or list is decoded; other strings stay Python test code."""
    if isinstance(tests, (bytes, bytearray)):
        tests = tests.decode()
    if isinstance(tests, str) and tests.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(tests)
        except json.JSONDecodeError:
            return tests
        if isinstance(data, (dict, list)):
            return data
    return tests


def _detect(data: Any, entry_point: str | None) -> str:
    if isinstance(data, str):
        return "code"
    if isinstance(data, Mapping):
        if "input_output" in data or ("inputs" in data and "outputs" in data):
            return "taco"
        if any(k in data for k in CODECONTESTS_SPLITS):
            return "codecontests"
        if "test_list" in data:
            return "mbpp"
        if "public_test_cases" in data or "private_test_cases" in data:
            return "livecodebench"
        if "test" in data:
            return "humaneval"
        raise ValueError(f"unrecognised test dict (keys {sorted(data)[:10]}); formats: {FORMATS}")
    if isinstance(data, Sequence):
        if not data:
            raise ValueError("no test cases: an empty test set cannot fail")
        if all(isinstance(c, Mapping) and "testtype" in c for c in data):
            return "livecodebench"
        return "stdio"
    raise ValueError(f"tests must be test code, a list of cases or a dataset's test dict, got {type(data).__name__}")


# --- stdin/stdout and call cases -------------------------------------------------------------------------------

def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise ValueError(f"{what} must be a string (or a list of lines), got {type(value).__name__} {value!r:.60}")


def _stdio_set(cases: list[StdioCase], fmt: str) -> TestSet:
    if not cases:
        raise ValueError(f"{fmt}: no test cases: an empty test set cannot fail")
    if all(not c.output.strip() for c in cases):
        raise ValueError(f"{fmt}: every case expects empty output, so a program that prints nothing passes")
    return TestSet("stdio", fmt, cases)


def _call_set(cases: list[CallCase], fn_name: Any, fmt: str, unwrap_single: bool = False) -> TestSet:
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise ValueError(f"{fmt}: call-based tests need fn_name, a Python identifier; got {fn_name!r}")
    if not cases:
        raise ValueError(f"{fmt}: no test cases: an empty test set cannot fail")
    if all(c.expected is None or (unwrap_single and c.expected == [None]) for c in cases):
        raise ValueError(f"{fmt}: every case expects None, so a function that returns nothing passes")
    return TestSet("call", fmt, cases, fn_name=fn_name, unwrap_single=unwrap_single)


def _parse_stdio(data: Any, fmt: str = "stdio", **_: Any) -> TestSet:
    if not isinstance(data, Sequence) or isinstance(data, str):
        raise ValueError(f"stdio tests must be a list of {{'input', 'output'}} dicts, got {type(data).__name__}")
    cases = []
    for i, case in enumerate(data):
        if not isinstance(case, Mapping) or not isinstance(case.get("input"), str) \
                or not isinstance(case.get("output"), str):
            raise ValueError(f"stdin/stdout test {i} must be a dict with str 'input' and 'output', got {case!r:.80}")
        cases.append(StdioCase(case["input"], case["output"]))
    return _stdio_set(cases, fmt)


def _int_keys(value: Any) -> Any:
    """JSON turns int dict keys into strings; TACO turns them back (a dict whose keys all read as ints)."""
    if isinstance(value, dict) and value and all(isinstance(k, str) and k.lstrip("-").isdigit() for k in value):
        return {int(k): v for k, v in value.items()}
    return value


def _parse_taco(data: Any, fn_name: str | None = None, fmt: str = "taco", **_: Any) -> TestSet:
    if "input_output" in data:
        data = _decoded(data["input_output"])
        if not isinstance(data, Mapping):
            raise ValueError(f"{fmt}: input_output must be a JSON object with 'inputs' and 'outputs'")
    inputs, outputs = data.get("inputs"), data.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError(f"{fmt}: 'inputs' and 'outputs' must be lists, got {type(inputs).__name__}, "
                         f"{type(outputs).__name__}")
    if len(inputs) != len(outputs):
        raise ValueError(f"{fmt}: {len(inputs)} inputs but {len(outputs)} outputs")
    name = fn_name or data.get("fn_name")
    if name is None:
        cases = [StdioCase(_text(i, f"{fmt} input {n}"), _text(o, f"{fmt} output {n}"))
                 for n, (i, o) in enumerate(zip(inputs, outputs))]
        return _stdio_set(cases, fmt)
    if inputs and all(isinstance(i, str) for i in inputs):  # LiveCodeBench's evaluation sample in this shape
        lcb = [{"input": i, "output": o, "testtype": "functional"} for i, o in zip(inputs, outputs)]
        return _parse_livecodebench(lcb, fn_name=name, fmt=fmt)
    calls = []
    for n, (args, expected) in enumerate(zip(inputs, outputs)):
        if not isinstance(args, list):
            raise ValueError(f"{fmt}: call input {n} must be the list of arguments, got {args!r:.60}")
        calls.append(CallCase([_int_keys(a) for a in args], _int_keys(expected)))
    return _call_set(calls, name, fmt, unwrap_single=True)


def _lcb_cases(value: Any, what: str) -> list:
    """LiveCodeBench test cases: a list, its JSON string, or (private tests) base64 of zlib of a pickled JSON
    string; the pickle is read with an unpickler that refuses every class, so it can only yield plain data."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError(f"livecodebench {what} must be a list or a string, got {type(value).__name__}")
    if not value.strip():
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        raw = zlib.decompress(base64.b64decode(value))
        return json.loads(_DataOnlyUnpickler(io.BytesIO(raw)).load())
    except Exception as e:  # noqa: BLE001 - any decoding failure means the same thing
        raise ValueError(f"livecodebench {what}: not JSON, nor base64/zlib/pickle of JSON ({e})") from None


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}: test cases are plain data")


def _lcb_fn_name(data: Mapping) -> str | None:
    meta = data.get("metadata")
    if isinstance(meta, str) and meta.strip():
        meta = json.loads(meta)
    return meta.get("func_name") if isinstance(meta, Mapping) else None


def _parse_livecodebench(data: Any, fn_name: str | None = None, fmt: str = "livecodebench", **_: Any) -> TestSet:
    if isinstance(data, Mapping):
        fn_name = fn_name or _lcb_fn_name(data)
        data = [*_lcb_cases(data.get("public_test_cases", []), "public_test_cases"),
                *_lcb_cases(data.get("private_test_cases", []), "private_test_cases")]
    if not isinstance(data, list):
        raise ValueError(f"livecodebench tests must be a list of cases, got {type(data).__name__}")
    types = {c.get("testtype") if isinstance(c, Mapping) else None for c in data}
    if not types <= {"stdin", "functional"}:
        raise ValueError(f"livecodebench testtype must be 'stdin' or 'functional', got {sorted(map(str, types))}")
    if len(types) > 1:
        raise ValueError("livecodebench: a problem mixes stdin and functional tests")
    if types != {"functional"}:
        return _parse_stdio(data, fmt)
    calls = []
    for n, case in enumerate(data):
        try:
            args = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
            calls.append(CallCase(args, json.loads(case["output"])))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"livecodebench functional case {n}: input/output must be JSON ({e})") from None
    return _call_set(calls, fn_name, fmt)


def _parse_codecontests(data: Any, fmt: str = "codecontests", **_: Any) -> TestSet:
    cases = []
    for split in CODECONTESTS_SPLITS:
        block = _decoded(data.get(split)) or {}
        if not isinstance(block, Mapping):
            raise ValueError(f"codecontests {split} must be {{'input': [...], 'output': [...]}}, got {block!r:.60}")
        ins, outs = list(block.get("input") or []), list(block.get("output") or [])
        if len(ins) != len(outs):
            raise ValueError(f"codecontests {split}: {len(ins)} inputs but {len(outs)} outputs")
        cases += [StdioCase(_text(i, f"{split} input"), _text(o, f"{split} output")) for i, o in zip(ins, outs)]
    return _stdio_set(cases, fmt)


# --- Python test code ------------------------------------------------------------------------------------------

def _parse_mbpp(data: Any, fmt: str = "mbpp", **_: Any) -> TestSet:
    if isinstance(data, list):  # the test_list alone
        data = {"test_list": data}
    if not isinstance(data, Mapping):
        raise ValueError(f"mbpp tests must be a dict with 'test_list' (or the list), got {type(data).__name__}")
    asserts = data.get("test_list")
    if not isinstance(asserts, list) or not all(isinstance(a, str) for a in asserts):
        raise ValueError(f"mbpp test_list must be a list of assert strings, got {asserts!r:.80}")
    imports = data.get("test_imports") or []
    if isinstance(imports, str):
        imports = [imports]
    code = "\n".join([*imports, data.get("test_setup_code") or "", *asserts])
    return _code_set(code, None, fmt)


def _parse_humaneval(data: Any, entry_point: str | None = None, fmt: str = "humaneval", **_: Any) -> TestSet:
    test = data.get("test") if isinstance(data, Mapping) else data
    if not isinstance(test, str):
        raise ValueError(f"humaneval 'test' must be test code, got {type(test).__name__}")
    entry_point = entry_point or (data.get("entry_point") if isinstance(data, Mapping) else None)
    # a row with a `test` field may hold pytest functions (KodCode): name it by what it holds
    return _code_set(test, entry_point, fmt if entry_point or "def check" in test else None)


def _parse_code(data: Any, entry_point: str | None = None, fmt: str = "code", **_: Any) -> TestSet:
    if not isinstance(data, str):
        raise ValueError(f"{fmt} tests must be Python test code, got {type(data).__name__}")
    return _code_set(data, entry_point, None if fmt == "code" else fmt)


def _code_set(code: str, entry_point: str | None, fmt: str | None) -> TestSet:
    tc = analyze(code, entry_point)
    fmt = fmt or ("humaneval" if tc.calls_check else "pytest" if tc.test_functions and not tc.test_statements
                  else "asserts")
    if tc.value_asserts is not None:
        cases = [ValueCase(i, expr, value) for i, (expr, value) in tc.value_asserts.items()]
        return TestSet("values", fmt, cases, code=tc.code, test_statements=tc.test_statements)
    return TestSet("code", fmt, code=tc.code, test_statements=tc.test_statements, test_functions=tc.test_functions)


_DICT_FORMATS = ("taco", "apps", "codecontests")
_PARSERS = {"taco": _parse_taco, "apps": _parse_taco, "livecodebench": _parse_livecodebench,
            "codecontests": _parse_codecontests, "mbpp": _parse_mbpp, "humaneval": _parse_humaneval,
            "pytest": _parse_code, "asserts": _parse_code, "code": _parse_code, "stdio": _parse_stdio}
