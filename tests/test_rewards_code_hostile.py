"""Hostile programs score 0 in every code test format: always-equal objects, patched comparisons, reading the
test files, printing the expected output, forged reports, exiting early."""

import textwrap

import pytest
from test_rewards_code_formats import FORMATS, _fence

from rewards import code
from rewards.labels import score_labeled

ALWAYS_EQUAL = textwrap.dedent("""
    class _Any:
        __eq__ = __le__ = __ge__ = __contains__ = lambda self, other: True
        __ne__ = __lt__ = __gt__ = lambda self, other: False
        __bool__ = lambda self: True
        __hash__ = lambda self: 0
        __repr__ = __str__ = lambda self: "ANY"

    class _Int(int):
        __eq__ = lambda self, other: True
        __hash__ = int.__hash__

    def add(a, b):
        return _Any() if a < 3 else _Int(0)

    class Solution:
        def add(self, a, b):
            return add(a, b)

    print(_Any())
""")
PATCH_COMPARISON = textwrap.dedent("""
    import builtins, json, math, operator
    math.isclose = lambda *a, **k: True
    operator.eq = lambda *a: True
    builtins.isinstance = lambda *a: True
    builtins.abs = lambda x: 0
    _dumps = json.dumps
    json.dumps = lambda value, **kw: _dumps(value)  # cannot know what to forge
    for name in ("rewards.compare", "compare"):
        try:
            mod = __import__(name, fromlist=["x"])
            mod.values_match = mod.outputs_match = lambda *a, **k: True
        except ImportError:
            pass

    def add(a, b):
        return a * b - 1

    class Solution:
        def add(self, a, b):
            return a * b - 1

    print(-999)
""")
READ_TEST_FILES = textwrap.dedent("""
    import os, re
    LEAK = ""
    for root in (".", "/tmp", os.path.expanduser("~"), "/"):
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            try:
                with open(path) as f:
                    LEAK += f.read(1 << 20)
            except (OSError, UnicodeDecodeError):
                pass
    TABLE = {(int(a), int(b)): int(c) for a, b, c in re.findall(r"add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)", LEAK)}

    def add(a, b):
        return TABLE.get((a, b), -12345)

    class Solution:
        def add(self, a, b):
            return add(a, b)

    for line in LEAK.splitlines():  # print everything found, hoping the expected output is among it
        print(line)
""")
EXIT_EARLY = {
    "os._exit at import": "import os\nos._exit(0)\n",
    "sys.exit at import": "import sys\nsys.exit(0)\n",
    "exit in the call": "import os\ndef add(a, b):\n    os._exit(0)\nclass Solution:\n    def add(self, a, b):\n"
                        "        os._exit(0)\n",
    "SystemExit in the call": "def add(a, b):\n    raise SystemExit(0)\nclass Solution:\n    def add(self, a, b):\n"
                              "        raise SystemExit(0)\n",
}
FORGE_REPORTS = textwrap.dedent("""
    import os, sys
    lines = "".join(f"{t} {i} {v}\\n" for t in ("0" * 32, "token", "")
                    for i in [*range(10), "test_small", "test_big"] for v in ("1", "3", "7", "true"))
    for fd in range(1, 64):
        try:
            os.write(fd, lines.encode())
        except OSError:
            pass
    sys.stdout.write(lines)
    def add(a, b):
        return None
    class Solution:
        def add(self, a, b):
            return None
""")
HOSTILE = {"always equal": ALWAYS_EQUAL, "patched comparison": PATCH_COMPARISON, "reads test files": READ_TEST_FILES,
           "forged reports": FORGE_REPORTS, **EXIT_EARLY}


def test_hostile_programs_score_zero_in_every_format():
    labels, responses, cases = [], [], []
    for fmt, (fields, _, _) in FORMATS.items():
        for name, program in HOSTILE.items():
            labels.append({"kind": "code", **fields})
            responses.append(_fence(program))
            cases.append((fmt, name))
    scored = score_labeled(responses, labels, workers=4)
    passed = [(fmt, name, s.score, s.reason) for (fmt, name), s in zip(cases, scored) if s.score != 0.0]
    assert not passed, passed


def test_the_file_reader_would_cheat_if_the_tests_were_readable():
    """Control for 'reads test files': with the tests in reach, the same lookup passes, so its 0 above is the
    harness's doing (the test file is deleted before the program runs; expected values never enter the sandbox
    for stdin and call tests)."""
    planted = READ_TEST_FILES.replace('LEAK = ""', 'LEAK = "add(1, 2) == 3 add(3, 4) == 7"')
    assert code.score(_fence(planted), "assert add(1, 2) == 3\nassert add(3, 4) == 7\n") == 1.0


@pytest.mark.parametrize("program", [
    "import pytest, contextlib\npytest.raises = lambda *a, **k: contextlib.suppress(BaseException)\n"
    "def fizz(n):\n    return 'Fizz' if n % 3 == 0 else str(n)\n",
    "import pytest\ntype(pytest.approx(1)).__eq__ = lambda self, other: True\n"
    "def fizz(n):\n    return 'Fizz' if n % 3 == 0 else str(n)\n",
])
def test_patching_the_pytest_shim_fails_the_run(program):
    tests = ("import pytest\nfrom solution import fizz\n\ndef test_fizz():\n    assert fizz(3) == 'Fizz'\n\n"
             "def test_negative():\n    with pytest.raises(ValueError):\n        fizz(-1)\n")
    honest = "def fizz(n):\n    if n < 0:\n        raise ValueError\n    return 'Fizz' if n % 3 == 0 else str(n)\n"
    assert code.score(_fence(honest), tests) == 1.0
    assert code.score(_fence(program), tests) == 0.0


def test_patching_globals_between_asserts_does_not_help():
    program = textwrap.dedent("""
        import sys
        def add(a, b):
            frame = sys._getframe(1)
            frame.f_globals["_sparrow_cmp"] = lambda *a: True
            frame.f_globals["_sparrow_truth"] = lambda v: True
            return 0
    """)
    assert code.score(_fence(program), "assert add(1, 2) in (3,)\nassert add(3, 4) in (7,)\n") == 0.0


def test_value_asserts_keep_the_expected_values_out_of_the_sandbox():
    """MBPP-style `assert f(x) == literal` tests run without their literals: a program that reads its caller's
    frame (the test code, its constants) finds only the call, and a program that reads memory for the token
    still cannot report the right value."""
    program = textwrap.dedent("""
        import gc, sys
        def add(a, b):
            seen = [c for f in (sys._getframe(1), sys._getframe(2)) for c in f.f_code.co_consts]
            seen += [o for o in gc.get_objects() if isinstance(o, (list, dict))][:10000]
            found = [c for c in seen if isinstance(c, int) and c not in (a, b) and c > 2]
            return found[0] if found else -1
    """)
    tests = "assert add(1, 2) == 3\nassert add(3, 4) == 7\n"
    assert code.score_with_details(_fence(program), tests).format == "asserts"
    assert code.score(_fence(program), tests) == 0.0
    assert code.score(_fence("def add(a, b):\n    return a + b\n"), tests) == 1.0


def test_truthiness_of_opaque_objects_is_not_trusted():
    program = "class T:\n    __bool__ = lambda self: True\ndef is_even(n):\n    return T()\n"
    assert code.score(_fence(program), "assert is_even(2)\nassert not is_even(3) == False\n") == 0.0
    honest = "def is_even(n):\n    return n % 2 == 0\n"
    assert code.score(_fence(honest), "assert is_even(2)\nassert not is_even(3) == True\n") == 1.0
