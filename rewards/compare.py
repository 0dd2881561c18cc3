"""Output comparison for code tests: one documented rule set, close to TACO's and LiveCodeBench's harnesses.

stdout of a stdin/stdout test (`outputs_match`), default (lenient) rules:
1. `\\r\\n` and `\\r` read as `\\n`; every line stripped of leading and trailing whitespace;
   blank lines at the start and at the end dropped (blank lines in between count).
2. The two outputs must have the same number of lines; line by line, the whitespace-split tokens must match
   (so runs of spaces or tabs between tokens do not matter).
3. Tokens match when equal as text, or when both are numbers and equal as numbers: two integers (no `.`, no
   exponent) must be exactly equal (`50000000000000000` != `50000000000000001`); otherwise they are compared as
   floats within `REL_TOL` relative or `ABS_TOL` absolute error (`2.500000` == `2.5`, `0.3333333` == `1/3` to
   6 digits), the tolerance competitive-programming checkers commonly allow. `nan`/`inf` words are not numbers.
`strict=True`: the outputs must be equal as text after newline normalisation (`\\r\\n` -> `\\n`) and removal of
trailing newlines.

Return values of call-based tests (`values_match`): structural equality of JSON data (tuples arrive as lists,
dict keys compare as strings), numbers compared as in rule 3 (a bool only equals a bool); with
`unwrap_single=True` (TACO/APPS, whose expected outputs are often wrapped in a one-element list) a value also
matches `expected[0]`, as TACO's harness allows.
"""

from __future__ import annotations

import math
import re
from typing import Any

REL_TOL = 1e-6
ABS_TOL = 1e-6
_INT = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")


def _lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    start, end = 0, len(lines)
    while start < end and not lines[start]:
        start += 1
    while end > start and not lines[end - 1]:
        end -= 1
    return lines[start:end]


def numbers_close(a: float, b: float) -> bool:
    """Floats equal within REL_TOL relative or ABS_TOL absolute error."""
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def tokens_match(got: str, expected: str) -> bool:
    """Rule 3 of the module docstring."""
    if got == expected:
        return True
    if not (_FLOAT.match(got) and _FLOAT.match(expected)):
        return False
    if _INT.match(got) and _INT.match(expected):
        return int(got) == int(expected)
    try:
        return numbers_close(float(got), float(expected))
    except OverflowError:
        return False


def outputs_match(got: str, expected: str, strict: bool = False) -> bool:
    """Whether a program's stdout `got` answers a test whose expected output is `expected` (module docstring)."""
    if strict:
        return got.replace("\r\n", "\n").rstrip("\n") == expected.replace("\r\n", "\n").rstrip("\n")
    got_lines, expected_lines = _lines(got), _lines(expected)
    if len(got_lines) != len(expected_lines):
        return False
    for g, e in zip(got_lines, expected_lines):
        if g == e:
            continue
        gt, et = g.split(), e.split()
        if len(gt) != len(et) or not all(tokens_match(a, b) for a, b in zip(gt, et)):
            return False
    return True


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _equal(got: Any, expected: Any) -> bool:
    if _number(got) and _number(expected):
        if isinstance(got, int) and isinstance(expected, int):
            return got == expected
        return numbers_close(float(got), float(expected))
    if isinstance(got, bool) or isinstance(expected, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(_equal(g, e) for g, e in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        g = {str(k): v for k, v in got.items()}
        e = {str(k): v for k, v in expected.items()}
        return g.keys() == e.keys() and all(_equal(g[k], e[k]) for k in e)
    if isinstance(got, tuple) or isinstance(expected, tuple):
        return _equal(list(got) if isinstance(got, tuple) else got,
                      list(expected) if isinstance(expected, tuple) else expected)
    return type(got) is type(expected) and got == expected


def values_match(got: Any, expected: Any, unwrap_single: bool = False) -> bool:
    """Whether a returned value (decoded from JSON) equals the expected one (module docstring)."""
    if _equal(got, expected):
        return True
    return unwrap_single and isinstance(expected, list) and len(expected) == 1 and _equal(got, expected[0])
