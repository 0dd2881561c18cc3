"""Code reward: fraction of tests passed by the program in a response, every run in the sandbox.

Program: the last fenced python block of the response (after dropping `<think>` blocks), else the last fenced
block, else the whole text.

Tests, either
- a string of Python test code (MBPP asserts, HumanEval `def check(candidate)`; with `entry_point="f"` the call
  `check(f)` is appended). Every top-level `assert` is one test, as is the appended `check(...)` call; other
  top-level statements are setup. Code with no such statement is a single test that passes when it runs cleanly.
  All of them run in one sandboxed process: the program is executed as module `solution` (so its
  `if __name__ == "__main__":` block does not run), then the test statements in order, each reporting pass/fail
  with a per-run random token. A program that exits early (`sys.exit(0)`, `os._exit`) passes nothing. The token
  defeats accidents and casual forgery, not a program that introspects the harness's memory.
- a list of `{"input": str, "output": str}` cases (TACO / LiveCodeBench stdin/stdout): one sandboxed run per case
  with `input` on stdin; it passes when stdout equals `output` after whitespace normalisation (trailing spaces of
  every line and trailing blank lines dropped, `\\r\\n` read as `\\n`).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.sandbox import Job, SandboxConfig, SandboxResult, run_many, run_program
from rewards.text import extract_code

DEFAULT_TIMEOUT_S = 10.0

_HARNESS = '''\
import ast, os, sys, traceback

def _sparrow_main():
    token = sys.stdin.readline().strip()
    report = os.fdopen(os.dup(1), "w")
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 1)  # the program's own prints are not graded and must not crowd out the report
    with open("tests.json") as f:
        plan = __import__("json").load(f)
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        with open("solution.py") as f:
            exec(compile(f.read(), "solution.py", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        return
    tree = ast.parse(plan["tests"], "tests.py")
    for i, node in enumerate(tree.body):
        code = compile(ast.Module(body=[node], type_ignores=[]), "tests.py", "exec")
        try:
            exec(code, ns)
            ok = True
        except BaseException:
            traceback.print_exc()
            ok = False
        if i in plan["test_statements"]:
            report.write(f"{token} {i} {int(ok)}\\n")
            report.flush()
        elif not ok:
            return

_sparrow_main()
'''


@dataclass(slots=True)
class CodeResult:
    score: float  # fraction of tests passed, in [0, 1]
    passed: int
    total: int
    program: str
    runs: list[SandboxResult] = field(default_factory=list)

    @property
    def statuses(self) -> list[str]:
        return [r.status for r in self.runs]


def _test_plan(tests: str, entry_point: str | None) -> tuple[str, list[int]]:
    """Test code (with the check call appended) and the indices of its top-level test statements."""
    if entry_point is not None:
        if not entry_point.isidentifier():
            raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
        tests = f"{tests}\n\ncheck({entry_point})\n"
    try:
        body = ast.parse(tests).body
    except SyntaxError as e:
        raise ValueError(f"tests are not valid Python: {e}") from e
    last = len(body) - 1
    statements = [i for i, node in enumerate(body)
                  if isinstance(node, ast.Assert) or (entry_point is not None and i == last)]
    return tests, statements or [last]


def _run_asserts(program: str, tests: str, entry_point: str | None, cfg: SandboxConfig) -> CodeResult:
    tests, statements = _test_plan(tests, entry_point)
    token = secrets.token_hex(16)
    plan = json.dumps({"tests": tests, "test_statements": statements})
    run = run_program(_HARNESS, stdin=token + "\n", config=cfg, files={"solution.py": program, "tests.json": plan})
    passed = set()
    for line in run.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == token and parts[2] == "1":
            passed.add(int(parts[1]))
    n = len(passed & set(statements))
    return CodeResult(n / len(statements), n, len(statements), program, [run])


def normalize_output(text: str) -> str:
    """Trailing whitespace of every line and trailing blank lines removed; CRLF read as LF."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _check_cases(cases: Sequence[Any]) -> list[dict]:
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not isinstance(case.get("input"), str) \
                or not isinstance(case.get("output"), str):
            raise ValueError(f"stdin/stdout test {i} must be a dict with str 'input' and 'output', got {case!r}")
    return list(cases)


def _run_io(program: str, cases: Sequence[dict], cfg: SandboxConfig, max_workers: int | None) -> CodeResult:
    runs = run_many([Job(program, c["input"]) for c in cases], cfg, max_workers)
    passed = sum(r.ok and normalize_output(r.stdout) == normalize_output(c["output"]) for r, c in zip(runs, cases))
    return CodeResult(passed / len(cases), passed, len(cases), program, runs)


def score_with_details(response: str, tests: str | Sequence[dict], timeout_s: float = DEFAULT_TIMEOUT_S,
                       entry_point: str | None = None, prefix: str | None = None,
                       config: SandboxConfig | None = None, max_workers: int | None = None) -> CodeResult:
    """Run the response's program against `tests`; `timeout_s` bounds each sandboxed run (wall clock).

    `prefix` (e.g. a HumanEval prompt) is put before a program that does not itself define `entry_point`, for
    completion-style responses that continue the function body."""
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    cfg = config or SandboxConfig(timeout_s=timeout_s)
    if config is not None and timeout_s != DEFAULT_TIMEOUT_S:
        cfg = SandboxConfig(**{**_as_dict(config), "timeout_s": timeout_s})
    program = extract_code(response)
    if prefix and not (entry_point and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", program, re.M)):
        program = prefix + program
    if isinstance(tests, str):
        return _run_asserts(program, tests, entry_point, cfg)
    if isinstance(tests, Sequence) and tests:
        return _run_io(program, _check_cases(tests), cfg, max_workers)
    raise ValueError(f"tests must be Python test code (str) or a non-empty list of {{'input', 'output'}} dicts, "
                     f"got {type(tests).__name__} {tests!r:.80}")


def score(response: str, tests: str | Sequence[dict], timeout_s: float = DEFAULT_TIMEOUT_S, **kw: Any) -> float:
    """Fraction of `tests` passed by the program in `response` (see module docstring); kw: entry_point, prefix,
    config, max_workers."""
    return score_with_details(response, tests, timeout_s, **kw).score


def _as_dict(cfg: SandboxConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}
