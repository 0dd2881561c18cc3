"""Code reward: fraction of tests passed by the program in a response, every run in the sandbox.

Program: the last fenced python block of the response (after dropping `<think>` blocks), else the last fenced
block, else the whole text. `prefix` (e.g. a HumanEval prompt) is put before a program that does not itself
define `entry_point`, for completion-style responses that continue the function body.

Tests: every dataset's format as it ships, a dict or its JSON string, detected from its shape or named with
`format=` (TACO/APPS `input_output`, LiveCodeBench, CodeContests, MBPP, HumanEval, pytest-style `test_*`
functions, plain assert code, `[{"input", "output"}]` lists); see `rewards.code_formats`. They are parsed and
validated before any program runs: a test set that cannot fail (no cases, no assert / check call / test function,
`check` without `entry_point`, every case expecting empty output or None) is a ValueError.

How each kind runs (see `rewards.code_harness` and `rewards.assert_harness`; every program gets
TACO/LiveCodeBench's standard import block):
- stdin/stdout cases: one sandboxed run per case with `input` on stdin; it passes when the run exits 0 and its
  stdout matches `output` by `rewards.compare.outputs_match` (lenient by default, `strict=True` for exact text).
- call cases: one sandboxed run calls the function on every case's arguments and reports the return values as
  JSON; the expected values never enter the sandbox and are compared here by `rewards.compare.values_match`.
- test code whose tests are all `assert <expression> == <literal>` (MBPP style): one sandboxed run evaluates the
  expressions after the program and the other statements; the literals stay here and are compared by `==`.
- other test code: one sandboxed run executes the program as module `solution`, then the test statements and test
  functions, each reporting pass/fail with a per-run random token. A program that exits early passes nothing
  after that point; one that prints the expected output gains nothing.
`timeout_s` bounds each sandboxed run (wall clock).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from rewards.assert_harness import CODE_HARNESS, guard_asserts
from rewards.code_formats import TestSet, parse_tests
from rewards.code_harness import CALL_HARNESS, STDIO_MAIN, VALUES_HARNESS, decode_value, prelude
from rewards.compare import outputs_match, values_match
from rewards.sandbox import Job, SandboxConfig, SandboxResult, run_many, run_program
from rewards.text import extract_code

DEFAULT_TIMEOUT_S = 10.0


@dataclass(slots=True)
class CodeResult:
    score: float  # fraction of tests passed, in [0, 1]
    passed: int
    total: int
    program: str
    runs: list[SandboxResult] = field(default_factory=list)
    format: str = ""

    @property
    def statuses(self) -> list[str]:
        return [r.status for r in self.runs]


def _result(passed: int, ts: TestSet, program: str, runs: list[SandboxResult]) -> CodeResult:
    return CodeResult(passed / ts.total, passed, ts.total, program, runs, ts.format)


def _reports(run: SandboxResult, token: str) -> dict[str, str]:
    """`{test id: payload}` of the harness's token-tagged report lines (the first line per id wins)."""
    found: dict[str, str] = {}
    for line in run.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == token:
            found.setdefault(parts[1], parts[2])
    return found


def _run_stdio(program: str, ts: TestSet, cfg: SandboxConfig, max_workers: int | None,
               strict: bool) -> CodeResult:
    files = {"solution.py": program, "prelude.py": prelude(program)}
    runs = run_many([Job(STDIO_MAIN, c.input, files) for c in ts.cases], cfg, max_workers)
    passed = sum(r.ok and outputs_match(r.stdout, c.output, strict) for r, c in zip(runs, ts.cases))
    return _result(passed, ts, program, runs)


def _run_calls(program: str, ts: TestSet, cfg: SandboxConfig) -> CodeResult:
    token = secrets.token_hex(16)
    plan = json.dumps({"fn_name": ts.fn_name, "args": [c.args for c in ts.cases]})
    run = run_program(CALL_HARNESS, stdin=token + "\n", config=cfg,
                      files={"solution.py": program, "prelude.py": prelude(program), "cases.json": plan})
    reports = _reports(run, token)
    passed = 0
    for i, case in enumerate(ts.cases):
        try:
            got = json.loads(reports[str(i)])
        except (KeyError, json.JSONDecodeError):
            continue
        passed += values_match(got, case.expected, ts.unwrap_single)
    return _result(passed, ts, program, [run])


def _run_values(program: str, ts: TestSet, cfg: SandboxConfig) -> CodeResult:
    token = secrets.token_hex(16)
    exprs = {c.index: c.expr for c in ts.cases}
    steps = [{"eval": exprs[i], "id": i} if i in exprs else {"exec": ast.unparse(node)}
             for i, node in enumerate(ast.parse(ts.code).body)]
    run = run_program(VALUES_HARNESS, stdin=token + "\n", config=cfg,
                      files={"solution.py": program, "prelude.py": prelude(program),
                             "tests.json": json.dumps({"steps": steps})})
    reports = _reports(run, token)
    passed = 0
    for case in ts.cases:
        try:
            passed += bool(decode_value(reports[str(case.index)]) == case.expected)
        except (KeyError, ValueError, TypeError):
            continue
    return _result(passed, ts, program, [run])


def _run_code(program: str, ts: TestSet, cfg: SandboxConfig) -> CodeResult:
    token = secrets.token_hex(16)
    plan = json.dumps({"code": guard_asserts(ts.code), "test_statements": ts.test_statements,
                       "test_functions": ts.test_functions, "numpy": bool(re.search(r"\b(numpy|np)\b", ts.code))})
    run = run_program(CODE_HARNESS, stdin=token + "\n", config=cfg,
                      files={"solution.py": program, "prelude.py": prelude(program), "tests.json": plan})
    reports = _reports(run, token)
    ids = [str(i) for i in ts.test_statements] + ts.test_functions
    passed = sum(reports.get(i) == "1" for i in ids)
    return _result(passed, ts, program, [run])


def program_of(response: str, entry_point: str | None = None, prefix: str | None = None) -> str:
    """The program to run: the response's code, after `prefix` unless it defines `entry_point` itself."""
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    program = extract_code(response)
    if prefix and not (entry_point and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", program, re.M)):
        program = prefix + program
    return program


def score_with_details(response: str, tests: Any, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                       fn_name: str | None = None, entry_point: str | None = None, prefix: str | None = None,
                       format: str | None = None, strict: bool = False, config: SandboxConfig | None = None,
                       max_workers: int | None = None) -> CodeResult:
    """Run the response's program against `tests` (module docstring); ValueError for tests that cannot fail."""
    ts = tests if isinstance(tests, TestSet) else parse_tests(tests, fn_name=fn_name, entry_point=entry_point,
                                                               format=format)
    program = program_of(response, entry_point, prefix)
    cfg = config or SandboxConfig(timeout_s=timeout_s)
    if config is not None and timeout_s != DEFAULT_TIMEOUT_S:
        cfg = replace(config, timeout_s=timeout_s)
    if ts.kind == "stdio":
        return _run_stdio(program, ts, cfg, max_workers, strict)
    if ts.kind == "call":
        return _run_calls(program, ts, cfg)
    if ts.kind == "values":
        return _run_values(program, ts, cfg)
    return _run_code(program, ts, cfg)


def score(response: str, tests: Any, timeout_s: float = DEFAULT_TIMEOUT_S, *, fn_name: str | None = None,
          entry_point: str | None = None, prefix: str | None = None, format: str | None = None,
          **kw: Any) -> float:
    """Fraction of `tests` passed by the program in `response` (module docstring); kw: strict, config,
    max_workers."""
    return score_with_details(response, tests, timeout_s, fn_name=fn_name, entry_point=entry_point, prefix=prefix,
                              format=format, **kw).score

