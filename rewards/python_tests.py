"""Python test code: which statements and functions are tests, and whether the tests can fail at all.

A test is a top-level statement holding an `assert` or `raise`, or calling `check(...)` (HumanEval), or a
`test*` function / `Test*` class method (pytest style, KodCode); it counts only when it reads something the
program provides: a name the test code does not define or import itself (names imported from module `solution`
are the program's), directly or through a helper or fixture that does. `if __name__ == "__main__":` blocks never
run. Test code with no such test cannot fail (an empty program would pass it): `analyze` raises ValueError, as it
does for `def check(` with neither a call nor an `entry_point` (then `check(entry_point)` is appended).
When every test is `assert <expression> == <literal>` (MBPP's asserts mostly are), `value_asserts` says so: the
expression can be evaluated in the sandbox and compared with the literal outside it.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass
from typing import Any

_BUILTINS = frozenset(dir(builtins)) | {"__name__", "__file__"}


@dataclass(slots=True)
class TestCode:
    code: str  # with `check(entry_point)` appended when needed
    test_statements: list[int]  # indices into the top level of `code`
    test_functions: list[str]  # "test_x" or "TestC.test_y"
    calls_check: bool
    # when every test is `assert <expression> == <literal>` (MBPP style): per test statement, the expression's
    # source and the literal's value, so the expected values can stay out of the sandbox
    value_asserts: dict[int, tuple[str, Any]] | None = None


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _value_assert(node: ast.stmt) -> tuple[str, Any] | None:
    """`assert expr == literal` (either order) as (expr source, literal value); None for any other statement."""
    if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.Eq)):
        return None
    left, right = node.test.left, node.test.comparators[0]
    for expr, lit in ((left, right), (right, left)):
        ok, value = _literal(lit)
        if ok and not _literal(expr)[0]:
            return ast.unparse(expr), value
    return None


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


def _bound_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names the test code binds itself, and names it imports from the program (module `solution`)."""
    bound, from_solution = set(), set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            bound.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(n.name)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            solution = isinstance(n, ast.ImportFrom) and n.module == "solution"
            for alias in n.names:
                name = alias.asname or alias.name.split(".")[0]
                (from_solution if solution or alias.name == "solution" else bound).add(name)
    return bound - from_solution, from_solution


def _depends_on_program(node: ast.AST, bound: set[str]) -> bool:
    """Whether `node` reads a name the test code does not define itself (i.e. one the program provides)."""
    return any(isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in bound
               and n.id not in _BUILTINS for n in ast.walk(node))


def _dependent_defs(tree: ast.Module, bound: set[str]) -> set[str]:
    """Names of the test code's functions (top level and in classes: helpers, fixtures) that use the program,
    directly or through another such function (by call, or by naming it as a parameter, as fixtures do)."""
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    used = {id(d): {n.id for n in ast.walk(d) if isinstance(n, ast.Name)} | {a.arg for a in ast.walk(d)
                                                                            if isinstance(a, ast.arg)}
            for d in defs}
    dependent: set[str] = set()
    changed = True
    while changed:
        changed = False
        for d in defs:
            if d.name not in dependent and (_depends_on_program(d, bound) or used[id(d)] & dependent):
                dependent.add(d.name)
                changed = True
    return dependent


def _has(node: ast.AST, kinds: tuple[type, ...]) -> bool:
    """Whether `node` holds one of `kinds` outside nested function and class bodies."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, kinds):
            return True
        stack += [c for c in ast.iter_child_nodes(n)
                  if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
    return False


def _calls(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
               for n in ast.walk(node))


def _test_functions(body: list[ast.stmt], bound: set[str]) -> list[str]:
    """Top-level `test*` functions and `Test*` classes' `test*` methods that read something of the program."""
    names = []
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            names += [node.name] if _depends_on_program(node, bound) else []
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names += [f"{node.name}.{m.name}" for m in node.body
                      if isinstance(m, ast.FunctionDef) and m.name.startswith("test")
                      and _depends_on_program(m, bound)]
    return names


def _is_test_statement(node: ast.stmt, bound: set[str]) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or _is_main_guard(node):
        return False
    return (_has(node, (ast.Assert, ast.Raise)) or _calls(node, "check")) and _depends_on_program(node, bound)


def analyze(code: str, entry_point: str | None = None) -> TestCode:
    """The tests in `code` (module docstring); ValueError when there is none or it cannot be parsed."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise ValueError(f"tests are not valid Python: {e}") from e
    defines_check = any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body)
    calls_check = any(not isinstance(n, (ast.FunctionDef, ast.ClassDef)) and _calls(n, "check") for n in tree.body)
    if entry_point is not None:
        if not isinstance(entry_point, str) or not entry_point.isidentifier():
            raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
        if defines_check and not calls_check:
            code = f"{code}\n\ncheck({entry_point})\n"
            tree = ast.parse(code)
            calls_check = True
    elif defines_check and not calls_check:
        raise ValueError("the tests define check(candidate) but never call it: pass entry_point= (the function "
                         "under test), or the tests cannot fail")
    bound, _ = _bound_names(tree)
    bound -= _dependent_defs(tree, bound)  # a helper or fixture that uses the program counts as the program
    functions = [] if calls_check else _test_functions(tree.body, bound)
    statements = [i for i, node in enumerate(tree.body) if _is_test_statement(node, bound)]
    if not statements and not functions:
        raise ValueError("the tests cannot fail: no assert, no check() call and no test_* function that uses "
                         "the program")
    values = {i: _value_assert(tree.body[i]) for i in statements}
    if functions or calls_check or any(v is None for v in values.values()):
        values = None
    return TestCode(code, statements, functions, calls_check, values)
