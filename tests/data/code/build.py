"""Writes the hand-made example files of this folder (run from the repo root: python tests/data/code/build.py).

Each file has a few problems in its dataset's real shape (field names, JSON-in-string fields, LiveCodeBench's
base64/zlib/pickle private tests, CodeContests' parquet structs); `responses.jsonl` holds correct and wrong
responses per problem with the score each must get.
"""

import base64
import json
import pickle
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def jsonl(name, rows):
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def lcb_private(cases):
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def fence(code):
    return f"Here is my solution.\n```python\n{code}```\n"


SUM = "a, b = map(int, input().split())\nprint(a + b)\n"
GCD = "a, b = map(int, input().split())\nprint(gcd(a, b))\n"  # gcd from the standard import block
SQUARES = "def sum_of_squares(xs):\n    return sum(x * x for x in xs)\n"
MEAN = "n = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs) / n)\n"
taco = [
    {"question": "Given two integers a and b, print a + b.", "solutions": json.dumps([SUM]), "starter_code": "",
     "input_output": json.dumps({"inputs": ["1 2\n", "10 -3\n", "  5   5  \n"], "outputs": ["3\n", "7\n", "10\n"]}),
     "difficulty": "EASY", "raw_tags": "[]", "name": None, "source": "codeforces", "tags": "[]",
     "skill_types": "[]", "url": "", "Expected Auxiliary Space": None, "time_limit": "1 second",
     "date": None, "picture_num": None, "memory_limit": None, "Expected Time Complexity": None},
    {"question": "Print the greatest common divisor of a and b.", "solutions": json.dumps([GCD]),
     "starter_code": "", "input_output": json.dumps({"inputs": ["12 18\n", "7 5\n"], "outputs": ["6\n", "1\n"]}),
     "difficulty": "EASY", "source": "codechef"},
    {"question": "Return the sum of the squares of the list.", "solutions": json.dumps([SQUARES]),
     "starter_code": "def sum_of_squares(xs):\n\t", "difficulty": "EASY", "source": "codewars",
     "input_output": json.dumps({"fn_name": "sum_of_squares", "inputs": [[[1, 2, 3]], [[]], [[-4]]],
                                 "outputs": [[14], [0], [16]]})},
    {"question": "Print the mean of n integers with 6 digits after the point.", "solutions": json.dumps([MEAN]),
     "starter_code": "", "difficulty": "EASY", "source": "atcoder",
     "input_output": json.dumps({"inputs": ["4\n1 2 3 4\n", "3\n1 1 2\n"], "outputs": ["2.500000\n", "1.333333\n"]})},
]
jsonl("taco.jsonl", taco)

TWO_SUM = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
           "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
           "                return (seen[target - x], i)\n            seen[x] = i\n")
EVEN = "n = int(input())\nprint('YES' if n % 2 == 0 else 'NO')\n"
apps = [
    {"problem_id": 1, "question": "Return the indices of the two numbers that add up to target.",
     "solutions": json.dumps([TWO_SUM]), "difficulty": "introductory", "url": "https://leetcode.com/problems/two-sum/",
     "starter_code": "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
     "input_output": json.dumps({"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]],
                                 "outputs": [[[0, 1]], [[1, 2]]]})},
    {"problem_id": 2, "question": "Print YES if n is even, else NO.", "solutions": json.dumps([EVEN]),
     "difficulty": "introductory", "url": "", "starter_code": "",
     "input_output": json.dumps({"inputs": ["4\n", "7\n"], "outputs": ["\nYES\n", "NO"]})},
]
jsonl("apps.jsonl", apps)

lcb = [
    {"question_title": "Triangle sum", "question_content": "Given N, print 1 + 2 + ... + N.", "platform": "atcoder",
     "question_id": "abc000_a", "contest_id": "abc000", "contest_date": "2024-01-06T00:00:00", "starter_code": "",
     "difficulty": "easy", "metadata": "{}",
     "public_test_cases": json.dumps([{"input": "3\n", "output": "6\n", "testtype": "stdin"}]),
     "private_test_cases": lcb_private([{"input": "10\n", "output": "55\n", "testtype": "stdin"},
                                        {"input": "1\n", "output": "1\n", "testtype": "stdin"}])},
    {"question_title": "Count pairs whose sum is less than target",
     "question_content": "Return the number of pairs (i, j), i < j, with nums[i] + nums[j] < target.",
     "platform": "leetcode", "question_id": "2917", "contest_id": "biweekly-contest-111",
     "contest_date": "2023-08-19T00:00:00", "difficulty": "easy",
     "starter_code": "class Solution:\n    def countPairs(self, nums: List[int], target: int) -> int:\n        ",
     "metadata": json.dumps({"func_name": "countPairs"}),
     "public_test_cases": json.dumps([{"input": "[-1, 1, 2, 3, 1]\n2", "output": "3", "testtype": "functional"}]),
     "private_test_cases": lcb_private([{"input": "[-6, 2, 5, -2, -7, -1, 3]\n-2", "output": "10",
                                         "testtype": "functional"}])},
]
jsonl("livecodebench.jsonl", lcb)

DIVIDE = "a, b = map(int, input().split())\nprint('%.10f' % (a / b))\n"
DIVIDE_LOOSE = "a, b = map(int, input().split())\nprint(a / b)\n"
DIVIDE_WRONG = "a, b = map(int, input().split())\nprint(a // b)\n"
REVERSE = "print(' '.join(input().split()[::-1]))\n"
REVERSE_WIDE = "print('  '.join(reversed(input().split())))\n"
cc_empty = {"input": [], "output": []}
codecontests = [
    {"name": "1000_A. Divide", "description": "Print a / b with an absolute or relative error of at most 1e-6.",
     "public_tests": {"input": ["1 3\n"], "output": ["0.3333333333\n"]},
     "private_tests": {"input": ["5 2\n"], "output": ["2.5000000000\n"]},
     "generated_tests": {"input": ["7 7\n", "2 3\n"], "output": ["1.0000000000\n", "0.6666666667\n"]},
     "source": 2, "difficulty": 7, "solutions": {"language": [3, 3], "solution": [DIVIDE, DIVIDE_LOOSE]},
     "incorrect_solutions": {"language": [3], "solution": [DIVIDE_WRONG]}, "cf_contest_id": 1000,
     "cf_index": "A", "cf_points": 500.0, "cf_rating": 800, "cf_tags": ["math"], "is_description_translated": False,
     "untranslated_description": "", "time_limit": {"seconds": 1, "nanos": 0}, "memory_limit_bytes": 256000000,
     "input_file": "", "output_file": ""},
    {"name": "1000_B. Reverse words", "description": "Print the words of the line in reverse order.",
     "public_tests": {"input": ["hello   world\n"], "output": ["world hello\n"]},
     "private_tests": {"input": ["a b c\n"], "output": ["c b a\n"]}, "generated_tests": cc_empty,
     "source": 2, "difficulty": 8, "solutions": {"language": [3, 3], "solution": [REVERSE, REVERSE_WIDE]},
     "incorrect_solutions": {"language": [3], "solution": ["print(input())\n"]}, "cf_contest_id": 1000,
     "cf_index": "B", "cf_points": 1000.0, "cf_rating": 900, "cf_tags": ["strings"],
     "is_description_translated": False, "untranslated_description": "", "time_limit": {"seconds": 2, "nanos": 0},
     "memory_limit_bytes": 256000000, "input_file": "", "output_file": ""},
]
pq.write_table(pa.Table.from_pylist(codecontests), HERE / "codecontests.parquet")

mbpp = [
    {"task_id": 1, "text": "Write a function square_list(xs) that returns the squares of xs.",
     "code": "def square_list(xs):\n    return [x * x for x in xs]", "test_setup_code": "",
     "test_list": ["assert square_list([1, 2, 3]) == [1, 4, 9]", "assert square_list([]) == []",
                   "assert square_list([-2]) == [4]"], "challenge_test_list": []},
    {"task_id": 2, "text": "Write a function is_palindrome(s) that tells whether s reads the same backwards.",
     "code": "def is_palindrome(s):\n    return s == s[::-1]", "test_setup_code": "",
     "test_list": ["assert is_palindrome('abba') == True", "assert is_palindrome('abc') == False",
                   "assert is_palindrome('') == True"], "challenge_test_list": []},
    {"task_id": 3, "text": "Write a function circle_area(r) that returns the area of a circle of radius r.",
     "code": "import math\ndef circle_area(r):\n    return math.pi * r * r", "test_setup_code": "import math",
     "test_list": ["assert math.isclose(circle_area(1.0), math.pi)", "assert circle_area(0) == 0"],
     "challenge_test_list": []},
]
jsonl("mbpp.jsonl", mbpp)
jsonl("mbpp_sanitized.jsonl", [
    {"source_file": "hand-made", "task_id": 4, "prompt": "Write a function hypotenuse(a, b) of a right triangle.",
     "code": "def hypotenuse(a, b):\n    return math.sqrt(a * a + b * b)",
     "test_imports": ["import math"],
     "test_list": ["assert math.isclose(hypotenuse(3, 4), 5.0)", "assert math.isclose(hypotenuse(5, 12), 13.0)"]},
])

FIZZ = ("def fizz(n):\n    if n < 0:\n        raise ValueError('negative')\n"
        "    return 'Fizz' if n % 3 == 0 else str(n)\n")
FIZZ_TEST = ("from solution import fizz\nimport pytest\n\ndef test_fizz():\n    assert fizz(3) == 'Fizz'\n\n"
             "def test_plain():\n    assert fizz(4) == '4'\n\ndef test_negative():\n"
             "    with pytest.raises(ValueError):\n        fizz(-1)\n")
ADD_ONE_TEST = ("import pytest\nfrom solution import add_one\n\n@pytest.mark.parametrize('x, y', [(1, 2), (5, 6)])\n"
                "def test_add_one(x, y):\n    assert add_one(x) == y\n\nclass TestAddOne:\n"
                "    def test_zero(self):\n        assert add_one(0) == 1\n\n"
                "    def test_float(self):\n        assert add_one(0.5) == pytest.approx(1.5)\n")
kodcode = [
    {"question_id": "Kod_1", "question": "Write fizz(n): 'Fizz' for multiples of 3, else str(n); ValueError if n < 0.",
     "solution": FIZZ, "test": FIZZ_TEST, "test_info": [{"function_name": "fizz", "parameter_list": "(n)"}],
     "style": "instruct", "subset": "Prefill"},
    {"question_id": "Kod_2", "question": "Write add_one(x) returning x + 1.",
     "solution": "def add_one(x):\n    return x + 1\n",
     "test": ADD_ONE_TEST, "test_info": [{"function_name": "add_one", "parameter_list": "(x)"}],
     "style": "instruct", "subset": "Prefill"},
]
jsonl("kodcode.jsonl", kodcode)

COUNT_PAIRS = ("class Solution:\n    def countPairs(self, nums: List[int], target: int) -> int:\n"
               "        return sum(nums[i] + nums[j] < target for i in range(len(nums)) "
               "for j in range(i + 1, len(nums)))\n")
COUNT_PAIRS_WRONG = COUNT_PAIRS.replace("< target", "<= target")
responses = [
    ("taco", 0, SUM, 1.0), ("taco", 0, SUM.replace("+", "*"), 0.0),
    ("taco", 1, GCD, 1.0), ("taco", 1, GCD.replace("gcd(a, b)", "min(a, b)"), 0.0),
    ("taco", 2, SQUARES, 1.0), ("taco", 2, "def sum_of_squares(xs):\n    return len(xs)\n", 1 / 3),
    ("taco", 3, MEAN, 1.0), ("taco", 3, MEAN.replace("sum(xs) / n", "sum(xs)"), 0.0),
    ("apps", 0, TWO_SUM, 1.0), ("apps", 0, TWO_SUM.replace("(seen[target - x], i)", "[i, i]"), 0.0),
    ("apps", 1, EVEN, 1.0), ("apps", 1, "input()\nprint('YES')\n", 0.5),
    ("livecodebench", 0, "n = int(input())\nprint(n * (n + 1) // 2)\n", 1.0),
    ("livecodebench", 0, "n = int(input())\nprint(n * n)\n", 1 / 3),
    ("livecodebench", 1, COUNT_PAIRS, 1.0), ("livecodebench", 1, COUNT_PAIRS_WRONG, 0.0),
    ("codecontests", 0, DIVIDE, 1.0), ("codecontests", 0, DIVIDE_LOOSE, 1.0), ("codecontests", 0, DIVIDE_WRONG, 0.25),
    ("codecontests", 1, REVERSE, 1.0), ("codecontests", 1, REVERSE_WIDE, 1.0),
    ("codecontests", 1, "print(input())\n", 0.0),
    ("mbpp", 0, mbpp[0]["code"], 1.0), ("mbpp", 0, "def square_list(xs):\n    return xs\n", 1 / 3),
    ("mbpp", 1, mbpp[1]["code"], 1.0), ("mbpp", 1, "def is_palindrome(s):\n    return False\n", 1 / 3),
    ("mbpp", 2, mbpp[2]["code"], 1.0), ("mbpp", 2, "def circle_area(r):\n    return 3 * r * r\n", 0.5),
    ("kodcode", 0, FIZZ, 1.0), ("kodcode", 0, "def fizz(n):\n    return 'Fizz'\n", 1 / 3),
    ("kodcode", 1, "def add_one(x):\n    return x + 1\n", 1.0),
    ("kodcode", 1, "def add_one(x):\n    return 1\n", 1 / 3),
]
jsonl("responses.jsonl", [{"dataset": d, "row": r, "response": fence(code), "score": s} for d, r, code, s in responses])
