"""What runs inside the sandbox around a program: the standard import block and the stdin and call harnesses.

- Import block (`prelude`): the names TACO's and LiveCodeBench's harnesses put before every solution
  (`from typing import *`, `math`/`gcd`/`sqrt`, `collections`, `heapq`, `bisect`, `itertools`, `functools`,
  `string`, `re`, `sys`, ...) plus `import numpy as np` when the program says `np` and the sandbox's interpreter
  has numpy; only the lines whose names the program mentions are included (the others would only cost time).
  Its names are placed under the program's builtins (builtins win a clash), not in its module: the program can
  use `gcd` or `List` without importing them, but a name it does not define itself (say `add`, which
  `from operator import *` provides) is neither called as the function under test nor imported by tests.
  The program's own `from __future__` imports keep working and its line numbers are unchanged.
- stdin/stdout (`STDIO_MAIN`): the program runs as `__main__` after the prelude; the parent grades stdout.
- call-based (`CALL_HARNESS`): the sandbox gets the program and the call ARGUMENTS only (never the expected
  values, so reading files or memory cannot reveal them). The program is loaded as module `solution` (its main
  block does not run) with stdin and stdout closed to it; the function (`fn_name`, or `Solution().fn_name` when
  the program defines `class Solution` with it, a fresh instance per call) is called once per case and the return
  value is reported as JSON (numpy values as lists/numbers; anything else that is not JSON data fails the case)
  on a private descriptor, each line tagged with the run's random token. The parent decodes and compares.
- value asserts (`VALUES_HARNESS`): test code whose every test is `assert <expression> == <literal>` (MBPP
  style) runs without its literals: the sandbox executes the other statements and evaluates each expression,
  reporting the value as type-tagged JSON (`decode_value`); the parent compares it with the literal by Python's
  `==`. As with call-based tests, the expected values never enter the sandbox.
- other test code: see `rewards.assert_harness`.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from typing import Any

# (module, also `from module import *`): the union of TACO's and LiveCodeBench's blocks, numpy aside
_BLOCK = (("bisect", True), ("collections", True), ("copy", True), ("datetime", True), ("decimal", False),
          ("fractions", True), ("functools", True), ("heapq", True), ("io", False), ("itertools", True),
          ("json", False), ("math", True), ("operator", True), ("random", True), ("re", False),
          ("statistics", True), ("string", True), ("sys", False), ("time", False), ("typing", True))
IMPORT_BLOCK = "".join(f"import {m}\n" + (f"from {m} import *\n" if star else "") for m, star in _BLOCK) + \
    "sys.setrecursionlimit(50000)\n"
_NUMPY = "try:\n    import numpy as np\nexcept ImportError:\n    pass\n"


@functools.cache
def _exports(module: str) -> frozenset[str]:
    mod = importlib.import_module(module)
    return frozenset(getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")])


def prelude(program: str) -> str:
    """The import block for `program`: each line of `IMPORT_BLOCK` whose names the program mentions (importing
    the rest would only cost time), and numpy as `np` when the program says `np`."""
    words = set(re.findall(r"[A-Za-z_]\w*", program))
    lines = ["import sys"]
    for module, star in _BLOCK:
        if module in words:
            lines.append(f"import {module}")
        if star and words & _exports(module):
            lines.append(f"from {module} import *")
    lines.append("sys.setrecursionlimit(50000)")
    return "\n".join(lines) + "\n" + (_NUMPY if "np" in words else "")


_PRELUDE_AS_BUILTINS = '''\
def _sparrow_builtins():
    """Builtins with the prelude's names under them: the program sees them, its module does not hold them."""
    import builtins
    pre = {}
    with open("prelude.py") as f:
        exec(compile(f.read(), "prelude.py", "exec"), pre)
    return {**{k: v for k, v in pre.items() if not k.startswith("__")}, **vars(builtins)}
'''

STDIO_MAIN = _PRELUDE_AS_BUILTINS + '''
_ns = {"__name__": "__main__", "__builtins__": _sparrow_builtins(), "__file__": "solution.py"}
with open("solution.py") as _f:
    _src = _f.read()
del _f
exec(compile(_src, "solution.py", "exec"), _ns)
'''

COMMON = _PRELUDE_AS_BUILTINS + '''
import json, os, sys, traceback, types

def _sparrow_setup(plan_file):
    token = sys.stdin.readline().strip()
    with open(plan_file) as f:
        plan = json.load(f)
    os.remove(plan_file)
    report = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # the program's own prints are not graded and must not crowd out the report
    sys.stdin = open(os.devnull)
    return token, plan, report

def _sparrow_load():
    """The program as module `solution` (prelude first); None when it does not load."""
    mod = types.ModuleType("solution")
    mod.__file__ = "solution.py"
    sys.modules["solution"] = mod
    try:
        mod.__dict__["__builtins__"] = _sparrow_builtins()
        with open("solution.py") as f:
            exec(compile(f.read(), "solution.py", "exec"), mod.__dict__)
    except BaseException:
        sys.__excepthook__(*sys.exc_info())  # not traceback's: under the code harness's guard it gets no frames
        return None
    return mod
'''

CALL_HARNESS = COMMON + '''
def _sparrow_plain(value):
    if type(value).__module__.split(".")[0] == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"return value of type {type(value).__name__} is not JSON data")

def _sparrow_target(mod, name):
    cls = mod.__dict__.get("Solution")
    if isinstance(cls, type) and hasattr(cls, name):
        return lambda *args: getattr(cls(), name)(*args)
    fn = mod.__dict__.get(name)
    return fn if callable(fn) else None

def _sparrow_main():
    token, plan, report = _sparrow_setup("cases.json")
    mod = _sparrow_load()
    if mod is None:
        return
    fn = _sparrow_target(mod, plan["fn_name"])
    if fn is None:
        print(f"no function {plan['fn_name']!r} (nor Solution().{plan['fn_name']})", file=sys.stderr)
        return
    dumps = json.dumps
    for i, args in enumerate(plan["args"]):
        try:
            value = dumps(fn(*args), default=_sparrow_plain)
        except BaseException:
            traceback.print_exc()
            continue
        report.write(f"{token} {i} {value}\\n")
        report.flush()

_sparrow_main()
'''

VALUES_HARNESS = COMMON + '''
import builtins

def _sparrow_enc(v, isinstance=isinstance, type=type):
    """v as JSON that keeps Python's types apart (tuples, sets, dicts with any keys, bytes, complex)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_sparrow_enc(x) for x in v]
    if isinstance(v, tuple):
        return {"t": [_sparrow_enc(x) for x in v]}
    if isinstance(v, dict):
        return {"d": [[_sparrow_enc(k), _sparrow_enc(x)] for k, x in v.items()]}
    if isinstance(v, (set, frozenset)):
        return {"s" if isinstance(v, set) else "f": [_sparrow_enc(x) for x in v]}
    if isinstance(v, bytes):
        return {"b": v.hex()}
    if isinstance(v, complex):
        return {"c": [v.real, v.imag]}
    if type(v).__module__.split(".")[0] == "numpy" and hasattr(v, "tolist"):
        return _sparrow_enc(v.tolist())
    raise TypeError(f"a value of type {type(v).__name__} cannot be compared outside the sandbox")

def _sparrow_main():
    token, plan, report = _sparrow_setup("tests.json")
    dumps = json.dumps
    mod = _sparrow_load()
    if mod is None:
        return
    ns = dict(mod.__dict__)
    ns.update(__name__="sparrow_tests", __builtins__=builtins)
    for step in plan["steps"]:
        if "exec" in step:
            try:
                exec(compile(step["exec"], "tests.py", "exec"), ns)
            except BaseException:
                traceback.print_exc()
                return
            continue
        try:
            value = dumps(_sparrow_enc(eval(compile(step["eval"], "tests.py", "eval"), ns)))
        except BaseException:
            traceback.print_exc()
            continue
        report.write(f"{token} {step['id']} {value}\\n")
        report.flush()

_sparrow_main()
'''


def decode_value(text: str) -> Any:
    """A value reported by `VALUES_HARNESS`, with its Python types back."""
    tags = {"t": tuple, "s": set, "f": frozenset}

    def hook(obj: dict) -> Any:
        (tag, payload), = obj.items()
        if tag in tags:
            return tags[tag](payload)
        if tag == "d":
            return {k: v for k, v in payload}
        if tag == "b":
            return bytes.fromhex(payload)
        if tag == "c":
            return complex(*payload)
        raise ValueError(f"unknown tag {tag!r}")

    return json.loads(text, object_hook=hook)
