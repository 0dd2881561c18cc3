"""Programs that reach into the test harness of Python test code (HumanEval check, pytest functions, asserts):
forging its token-tagged reports through its frames, replacing its own helpers through `__main__` or the pytest
shim, reading memory, adding audit hooks. Each paid 1.0 before the harness's guard; each scores 0 now."""

import textwrap

import pytest
from test_rewards_code_formats import HUMANEVAL, PYTEST, _fence

from rewards import code

ASSERTS_CODE = "y = 3\nassert add(1, 2) == y\nassert add(3, 4) == y + 4\n"  # not literals: the code harness
TESTS = {"humaneval": HUMANEVAL, "pytest": PYTEST, "asserts": ASSERTS_CODE}

FORGE = """
    while "report" not in f.f_locals:
        f = f.f_back
    L = f.f_locals
    for i in [*map(str, L["plan"]["test_statements"]), *L["plan"]["test_functions"]]:
        L["report"].write(f"{L['token']} {i} 1\\n")
    L["report"].flush()
    os._exit(0)
"""
HANDLER = "import os, signal, time\ndef add(a, b):\n    def h(sig, f):" + FORGE.replace("\n    ", "\n        ")
HACKS = {
    "frame walk at import": "import os, sys\nf = sys._getframe()\nif True:" + FORGE + "def add(a, b):\n    return 0\n",
    "frame walk in the call": "import os, sys\ndef add(a, b):\n    f = sys._getframe()" + FORGE,
    "frame from a traceback": "import os\ndef add(a, b):\n    try:\n        raise ValueError\n"
                              "    except ValueError as e:\n        f = e.__traceback__.tb_frame" + FORGE,
    "frame from a generator": "import os\ndef add(a, b):\n    def g():\n        yield\n    it = g()\n    next(it)\n"
                              "    f = it.gi_frame" + FORGE,
    "__main__ comparison table": "import __main__\nfor k in list(__main__._OPS):\n"
                                 "    __main__._OPS[k] = lambda a, b: True\ndef add(a, b):\n    return 0\n",
    "__main__ test runner": "import __main__\n__main__._sparrow_run = lambda thunk, snapshot: True\n"
                            "def add(a, b):\n    return 0\n",
    "__main__ trusted types": "import __main__\nclass A:\n    __eq__ = lambda s, o: True\n__main__._PLAIN += (A,)\n"
                              "def add(a, b):\n    return A()\n",
    "harness globals via pytest": "import pytest\npytest.raises.__globals__['_OPS']['=='] = lambda a, b: True\n"
                                  "def add(a, b):\n    return 0\n",
    "harness code swap": "import pytest\ng = pytest.raises.__globals__\n"
                         "g['_sparrow_cmp'].__code__ = (lambda *a, **k: True).__code__\ndef add(a, b):\n    return 0\n",
    "audit hook reads the tests": textwrap.dedent("""
        import sys, types
        SEEN = []
        sys.addaudithook(lambda e, a: SEEN.append(a[0]) if e == "exec" else None)
        def consts(c):
            for k in c.co_consts:
                yield from consts(k) if isinstance(k, types.CodeType) else (k,)
        def add(a, b):
            ks = [k for c in SEEN if isinstance(c, types.CodeType) for k in consts(c) if type(k) is int]
            ks += [c for c in SEEN if type(c) is int]
            return next((ks[i + 2] for i in range(len(ks) - 2) if ks[i:i + 2] == [a, b]), -1)
    """),
    "frame from a signal handler": HANDLER + "    signal.signal(signal.SIGUSR1, h)\n"
                                   "    signal.raise_signal(signal.SIGUSR1)\n",
    "frame from a timer signal": HANDLER + "    signal.signal(signal.SIGALRM, h)\n"
                                 "    signal.setitimer(signal.ITIMER_REAL, 0.01)\n    time.sleep(1)\n",
    "memory through /proc": "import os\nos.symlink('/proc/self/mem', 'm')\nopen('m', 'rb')\n"
                            "def add(a, b):\n    return 0\n",
    "heap walk": "import gc\ngc.get_objects()\ndef add(a, b):\n    return 0\n",
    "tracing": "import sys\nsys.settrace(lambda *a: None)\ndef add(a, b):\n    return 0\n",
}


@pytest.mark.parametrize("hack", HACKS)
@pytest.mark.parametrize("fmt", TESTS)
def test_reaching_into_the_harness_scores_zero(fmt, hack):
    res = code.score_with_details(_fence(HACKS[hack]), TESTS[fmt])
    assert res.score == 0.0, res.runs[0].stderr[-500:]


def test_the_guard_leaves_ordinary_programs_alone():
    """namedtuple, Enum, typing.NamedTuple and logging ask for a frame and fall back when refused."""
    program = textwrap.dedent("""
        import asyncio, collections, dataclasses, enum, logging, typing
        P = collections.namedtuple("P", "x y")
        C = enum.Enum("C", "A B")
        class Q(typing.NamedTuple):
            a: int
        @dataclasses.dataclass
        class D:
            x: int = 0
        logging.getLogger("x").warning("hi")
        async def plus(a, b):
            return a + b
        def add(a, b):
            return asyncio.run(plus(P(a, 0).x, Q(b).a)) + D().x + C.A.value - 1
    """)
    for tests in TESTS.values():
        assert code.score(_fence(program), tests) == 1.0
