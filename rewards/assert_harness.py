"""The sandbox harness for Python test code (asserts, HumanEval check, pytest-style functions).

The program is loaded as module `solution` (so `from solution import f` works) after the standard import block
(`rewards.code_harness`); the test code runs in a namespace of its own seeded with the program's names, then each
`test_*` function is called. Before the program runs, the test file is read and deleted. Asserts are rewritten
(`guard_asserts`) so that a comparison only trusts plain data (numbers, strings, lists, dicts, ... and numpy
values): comparing an object of the program's own class with anything but an object of the same class, or taking
its truth value, fails the assert (even under `not`), so an always-equal or always-true object gains nothing. When
the test code mentions numpy, the harness imports it before the program and trusts exactly its types (numpy
semantics kept, `(a == b).all()` works) and watches `numpy` / `numpy.testing` for replacement too. Each test
statement or function reports pass/fail with the token; once builtins, `math`, `operator`, the pytest shim or the
guard helpers are found replaced (after the program loads, after each test), the run stops there. `pytest` is a
small shim (`raises`, `approx`, `mark.parametrize`, `fixture` resolved by parameter name, other marks ignored). The
harness's own names are watched too (`import __main__` or `pytest.raises.__globals__` lead to them).
The program shares the process with the test code, so from the moment it loads an audit hook (`_sparrow_guard`)
refuses what would reach the harness's frames (which hold the report channel and its token) or the test code:
`sys._getframe` (ValueError, so namedtuple, enum and typing fall back), traceback/generator frames, tracing, gc heap
walks, ctypes, files on /proc, new audit hooks, and changes to the harness's functions. A program that needs these
(`traceback.format_exc` included) fails. A Python signal handler also receives a frame, but always one of the main
thread: the program and the tests run in a worker thread, and the token and report channel exist only in that
thread's frames, so a handler finds neither (a program cannot install handlers from the worker thread either).
"""

from __future__ import annotations

import ast

from rewards.code_harness import COMMON

CODE_HARNESS = COMMON + '''
import builtins, math, operator, re as _re, threading

_PLAIN = (int, float, complex, str, bytes, bool, type(None))
_NUMPY = frozenset()  # exact numpy types, set only when the harness itself imported numpy before the program ran
_EXCEPTHOOK = sys.__excepthook__  # prints a traceback without asking for frames through the audited attributes

def _sparrow_trust_numpy():
    global _NUMPY
    try:
        import numpy, numpy.testing
    except ImportError:
        return []
    _NUMPY = frozenset({*(t for t in set(numpy.sctypeDict.values()) if isinstance(t, type)), numpy.ndarray})
    return [vars(numpy), vars(numpy.testing)]

class _Denied(ValueError, RuntimeError):  # ValueError: stdlib callers of sys._getframe fall back on it;
    pass                                    # RuntimeError: refuses a new audit hook silently

_DENIED = frozenset(("sys._getframe", "sys._current_frames", "sys._current_exceptions", "sys.settrace",
                     "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook"))
_FRAME_ATTRS = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))

def _sparrow_guard(protected, denied=_DENIED, frame_attrs=_FRAME_ATTRS, Denied=_Denied, id=id, stat=os.stat,
                   proc_dev=os.stat("/proc").st_dev, frozenset=frozenset, map=map):
    """Audit hook for the rest of the run. The harness's frames hold the report channel and its token, and the
    test code passes through compile/exec events, so the program gets no frames, tracing, heap walks, ctypes,
    /proc files (memory) or audit hooks of its own, and cannot change the harness's functions and classes."""
    ids = frozenset(map(id, protected))

    def hook(event, args):
        if event in denied or event.startswith("ctypes.") or (
                event == "object.__getattr__" and args[1] in frame_attrs) or (
                event in ("object.__setattr__", "object.__delattr__") and id(args[0]) in ids):
            raise Denied(f"{event} is not allowed in the sandbox")
        if event == "open" and not isinstance(args[0], int):
            try:
                on_proc = stat(args[0]).st_dev == proc_dev
            except (OSError, TypeError, ValueError):
                on_proc = False
            if on_proc:
                raise Denied("/proc is not readable in the sandbox")
    return hook

def _sparrow_data(v, type=type, hasattr=hasattr):
    """v as trusted data, or raise TypeError: plain data, numpy values of the harness's own numpy (kept, so
    numpy semantics hold), other numpy-looking values converted with tolist(); nothing else is trusted."""
    t = type(v)
    if t in _PLAIN:
        return v
    if t in (list, tuple, set, frozenset):
        return t(_sparrow_data(x) for x in v)
    if t is dict:
        return {_sparrow_data(k): _sparrow_data(x) for k, x in v.items()}
    if t is _Approx:
        return v
    if t in _NUMPY and str(getattr(v, "dtype", "")) != "object":
        return v
    if t.__module__.split(".")[0] == "numpy" and hasattr(v, "tolist"):
        return _sparrow_data(v.tolist())
    raise TypeError(t)

_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
        ">=": operator.ge, "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
        "is": operator.is_, "is not": operator.is_not}

def _sparrow_cmp(ops, *values, type=type, zip=zip, len=len, TypeError=TypeError):
    """`values[0] ops[0] values[1] ...` as Python chains it (the first falsy result, else the last), each
    comparison on trusted data only."""
    for i, (op, a, b) in enumerate(zip(ops, values, values[1:])):
        if op not in ("is", "is not"):
            try:
                a, b = _sparrow_data(a), _sparrow_data(b)
            except TypeError:
                if type(a) is not type(b):  # an opaque object only compares with one of its own type; raising
                    raise AssertionError("untrusted comparison")  # fails the assert even under `not`
        result = _OPS[op](a, b)
        if i < len(ops) - 1 and not _sparrow_truth(result):
            return result
    return result

def _sparrow_truth(v, type=type, bool=bool):
    if type(v) is bool:
        return v
    try:
        return bool(_sparrow_data(v))
    except TypeError:
        raise AssertionError("untrusted truth value") from None

class _Approx:
    def __init__(self, expected, rel=None, abs=None):
        self.expected, self.rel, self.abs = expected, 1e-6 if rel is None else rel, 1e-12 if abs is None else abs

    def _close(self, a, b):
        if isinstance(b, (list, tuple)):
            return isinstance(a, (list, tuple)) and len(a) == len(b) and all(map(self._close, a, b))
        if isinstance(b, dict):
            return isinstance(a, dict) and a.keys() == b.keys() and all(self._close(a[k], b[k]) for k in b)
        try:
            return math.isclose(a, b, rel_tol=self.rel, abs_tol=self.abs)
        except TypeError:
            return a == b

    def __eq__(self, other):
        try:
            return self._close(_sparrow_data(other), self.expected)
        except TypeError:
            return False

    __hash__ = None

class _Raises:
    def __init__(self, exc, match=None):
        self.exc, self.match, self.value = exc, match, None

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        if t is None:
            raise AssertionError(f"DID NOT RAISE {self.exc}")
        if not issubclass(t, self.exc):
            return False
        if self.match is not None and not _re.search(self.match, str(v)):
            raise AssertionError(f"{v!r} does not match {self.match!r}")
        self.value = v
        return True

def _raises(exc, *args, match=None, **kwargs):
    ctx = _Raises(exc, match)
    if not args:
        return ctx
    with ctx:
        args[0](*args[1:], **kwargs)
    return ctx

def _parametrize(names, values, **_):
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    def wrap(fn):
        def run(*head, **given):
            for row in values:
                row = row if len(names) > 1 else (row,)
                fn(*head, **given, **dict(zip(names, row)))
        run.__name__ = fn.__name__
        run._sparrow_fn = getattr(fn, "_sparrow_fn", fn)  # the test itself, for its fixture parameters
        run._sparrow_names = [*names, *getattr(fn, "_sparrow_names", [])]
        return run
    return wrap

class _Mark:
    parametrize = staticmethod(_parametrize)

    def __getattr__(self, name):
        return lambda *a, **k: (a[0] if len(a) == 1 and callable(a[0]) and not k else (lambda fn: fn))

def _fixture(*a, **k):
    def mark(fn):
        fn._sparrow_fixture = True
        return fn
    return mark(a[0]) if len(a) == 1 and callable(a[0]) and not k else mark

def _pytest_shim():
    mod = types.ModuleType("pytest")
    mod.raises, mod.approx, mod.mark, mod.fixture = _raises, _Approx, _Mark(), _fixture
    return mod

def _sparrow_snapshot(ns, extra):
    watched = [vars(builtins), vars(math), vars(operator), vars(sys.modules["pytest"]), vars(_Approx), vars(_Raises),
               vars(_Mark), globals(), _OPS, *extra]  # the harness's own names: pytest's functions lead to them
    return [(d, dict(d)) for d in watched] + [(ns, {k: ns[k] for k in ("_sparrow_cmp", "_sparrow_truth")})]

def _sparrow_tampered(snapshot, any=any, set=set):
    return any(d.get(k, None) is not v for d, saved in snapshot for k, v in saved.items()) or any(
        set(d) - set(saved) for d, saved in snapshot[:-1])

def _sparrow_protected():
    """The harness's functions and classes (and their methods): the guard keeps the program from changing them."""
    found = [v for k, v in globals().items() if k.startswith("_") and isinstance(v, (type, types.FunctionType))]
    return found + [m for c in found if isinstance(c, type) for m in vars(c).values()
                    if isinstance(m, (types.FunctionType, staticmethod))]

def _sparrow_main():  # every harness function it calls is bound before the program runs (see the guard)
    # Python runs signal handlers in the main thread, on its current frame: the program and the tests run in a
    # worker thread, so the token and the report channel are only ever in that thread's frames
    worker = threading.Thread(target=_sparrow_main_bound, name="sparrow-tests", args=(
        _sparrow_run, _sparrow_tampered, _sparrow_call, _sparrow_guard, _sparrow_protected()))
    worker.start()
    worker.join()

def _sparrow_main_bound(run, tampered, call, guard, protected):
    token, plan, report = _sparrow_setup("tests.json")
    sys.modules["pytest"] = _pytest_shim()
    ns = {"__name__": "sparrow_tests", "_sparrow_cmp": _sparrow_cmp, "_sparrow_truth": _sparrow_truth}
    extra = _sparrow_trust_numpy() if plan["numpy"] else []
    snapshot = _sparrow_snapshot(ns, extra)  # before the program runs: what it replaces at import is caught too
    sys.addaudithook(guard(protected))
    mod = _sparrow_load()
    if mod is None:
        return
    ns.update({k: v for k, v in mod.__dict__.items() if k not in ns}, __builtins__=builtins)
    if tampered(snapshot):
        print("the program replaced builtins or comparison helpers", file=sys.stderr)
        return
    tree = __import__("ast").parse(plan["code"], "tests.py")
    tests = set(plan["test_statements"])
    for i, node in enumerate(tree.body):
        code = compile(__import__("ast").Module(body=[node], type_ignores=[]), "tests.py", "exec")
        ok = run(lambda: exec(code, ns), snapshot)
        if i in tests:
            report.write(f"{token} {i} {int(ok)}\\n")
            report.flush()
        if ok is None or (not ok and i not in tests):
            return
    for name in plan["test_functions"]:
        ok = run(lambda: call(ns, name), snapshot)
        report.write(f"{token} {name} {int(bool(ok))}\\n")
        report.flush()
        if ok is None:
            return

def _sparrow_fixtures(fn, ns, owner, skip, depth=0):
    """Keyword arguments for fn's parameters that name fixtures (functions marked by pytest.fixture, in the test
    namespace or on the test class), each fixture's own fixtures resolved first; a generator fixture gives its
    first value."""
    import inspect
    kwargs = {}
    params = list(inspect.signature(fn).parameters.values())
    for p in params[1:] if owner is not None and not inspect.ismethod(fn) else params:  # drop an unbound self
        fixture = getattr(owner, p.name, None) if owner is not None else None
        fixture = fixture if getattr(fixture, "_sparrow_fixture", False) else ns.get(p.name)
        if p.name in skip or depth > 20 or not getattr(fixture, "_sparrow_fixture", False):
            continue
        bound = getattr(fixture, "__self__", None)
        value = fixture(**_sparrow_fixtures(fixture, ns, bound, (), depth + 1))
        kwargs[p.name] = next(value) if inspect.isgenerator(value) else value
    return kwargs

def _sparrow_call(ns, name):
    owner = None
    if "." in name:
        cls, meth = name.split(".", 1)
        owner = ns[cls]()
        if hasattr(owner, "setup_method"):
            owner.setup_method(getattr(owner, meth))
        target = getattr(owner, meth)
    else:
        target = ns[name]
    base = getattr(target, "_sparrow_fn", target)
    target(**_sparrow_fixtures(base, ns, owner, set(getattr(target, "_sparrow_names", ()))))

def _sparrow_run(thunk, snapshot, tampered=_sparrow_tampered, excepthook=_EXCEPTHOOK, exc_info=sys.exc_info):
    """True (passed), False (failed) or None (failed, and the harness was tampered with: stop)."""
    try:
        thunk()
        ok = True
    except BaseException:
        excepthook(*exc_info())
        ok = False
    return None if tampered(snapshot) else ok

_sparrow_main()
'''


class _GuardAsserts(ast.NodeTransformer):
    """`assert e` -> `assert _sparrow_truth(e')`, every comparison in e' -> `_sparrow_cmp(ops, *operands)`."""

    _NAMES = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
              ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}

    def __init__(self) -> None:
        self.in_assert = 0

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        self.in_assert += 1
        test = self.visit(node.test)
        self.in_assert -= 1
        call = ast.Call(ast.Name("_sparrow_truth", ast.Load()), [test], [])
        return ast.copy_location(ast.Assert(call, node.msg), node)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        node = self.generic_visit(node)
        if not self.in_assert:
            return node
        ops = ast.Tuple([ast.Constant(self._NAMES[type(op)]) for op in node.ops], ast.Load())
        call = ast.Call(ast.Name("_sparrow_cmp", ast.Load()), [ops, node.left, *node.comparators], [])
        return ast.copy_location(call, node)

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:  # a lambda in an assert runs later, elsewhere
        depth, self.in_assert = self.in_assert, 0
        node = self.generic_visit(node)
        self.in_assert = depth
        return node


def guard_asserts(code: str) -> str:
    """Test code with every assert's comparisons and truth test routed through the harness's guards."""
    tree = _GuardAsserts().visit(ast.parse(code))
    return ast.unparse(ast.fix_missing_locations(tree))
