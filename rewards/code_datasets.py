"""Code prompt sets from local files, each dataset in the shape it ships: `{prompt, label}` rows + original fields.

Loaders (re-exported by `rewards.datasets`), every one reading `.jsonl` (optionally `.gz`) or `.parquet`:
- `load_taco(path)` / `load_apps(path)`: `question`, `input_output` (JSON: inputs, outputs, optional fn_name),
  optional `starter_code`.
- `load_livecodebench(path)`: `question_content`, `public_test_cases` / `private_test_cases` (JSON, or the
  base64/zlib/pickle encoding of code_generation_lite), `metadata` (JSON with `func_name`), `starter_code`.
- `load_codecontests(path, splits=...)`: `description`, `public_tests` / `private_tests` / `generated_tests`.
- `load_mbpp(path)`: `text` (or `prompt`, sanitized), `test_list`, `test_setup_code`, `test_imports`.
- `load_kodcode(path)`: `question`, `test` (pytest code importing from `solution`).
- `load_code_dataset(path, format=None)`: any of them, the format named or detected from the first row's fields.
Each label is parsed and validated by `rewards.labels.parse_label`; a row whose tests cannot fail (or cannot be
read) is dropped with a warning that counts them (`skip_invalid=False` raises instead).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rewards.code_formats import CODECONTESTS_SPLITS
from rewards.labels import parse_label
from rewards.rows import read_rows, to_dataset, with_prompt

STDIO_INSTRUCTION = ("Read the input from standard input and write the answer to standard output. "
                     "Reply with the whole program in a ```python block.")
CALL_INSTRUCTION = "Complete the code below. Reply with the whole code in a ```python block."
FUNCTION_INSTRUCTION = "Write a Python function. Reply with the code in a ```python block."


def _question(text: str, starter_code: str | None, call_based: bool) -> str:
    if call_based or (starter_code or "").strip():
        return f"{text}\n\n{CALL_INSTRUCTION}\n\n```python\n{starter_code or ''}\n```"
    return f"{text}\n\n{STDIO_INSTRUCTION}"


def _taco_row(row: dict, fmt: str) -> tuple[str, dict]:
    io = row["input_output"]
    data = json.loads(io) if isinstance(io, str) and io.strip() else io
    fn_name = data.get("fn_name") if isinstance(data, dict) else None
    label = {"kind": "code", "tests": io, "format": fmt}
    return _question(row["question"], row.get("starter_code"), fn_name is not None), label


def _lcb_row(row: dict) -> tuple[str, dict]:
    tests = {k: row[k] for k in ("public_test_cases", "private_test_cases", "metadata") if k in row}
    label = parse_label({"kind": "code", "tests": tests, "format": "livecodebench"})
    cases = label.tests.cases
    if label.tests.kind == "call":
        plain = [{"input": "\n".join(json.dumps(a) for a in c.args), "output": json.dumps(c.expected),
                  "testtype": "functional"} for c in cases]
    else:
        plain = [{"input": c.input, "output": c.output, "testtype": "stdin"} for c in cases]
    out = {"kind": "code", "tests": plain, "format": "livecodebench"}
    if label.tests.fn_name:
        out["fn_name"] = label.tests.fn_name
    return _question(row["question_content"], row.get("starter_code"), label.tests.kind == "call"), out


def _codecontests_row(row: dict, splits: Sequence[str]) -> tuple[str, dict]:
    tests = {k: row.get(k) or {"input": [], "output": []} for k in splits}
    return _question(row["description"], None, False), {"kind": "code", "tests": tests, "format": "codecontests"}


def _mbpp_row(row: dict) -> tuple[str, dict]:
    text = row.get("text") or row.get("prompt")
    asserts = "\n".join(row["test_list"])
    question = f"{text}\nYour code should pass these tests:\n\n{asserts}\n\n{FUNCTION_INSTRUCTION}"
    tests = {k: row[k] for k in ("test_list", "test_setup_code", "test_imports") if row.get(k) is not None}
    return question, {"kind": "code", "tests": tests, "format": "mbpp"}


def _kodcode_row(row: dict) -> tuple[str, dict]:
    question = (f"{row['question']}\n\nThe code is imported as module `solution` by the tests. "
                f"{FUNCTION_INSTRUCTION}")
    return question, {"kind": "code", "tests": row["test"], "format": "pytest"}


def _load(path: str | Path, required: tuple[str, ...], make: Callable[[dict], tuple[str, dict]],
          skip_invalid: bool):
    path = Path(path)
    rows, dropped = [], []
    for i, row in enumerate(read_rows(path)):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks field(s) {missing}; it has {sorted(row)}")
        try:
            prompt, label = make(row)
            parse_label(label)
        except (ValueError, TypeError, KeyError) as e:
            if not skip_invalid:
                raise ValueError(f"{path}: row {i}: {e}") from e
            dropped.append(f"row {i}: {e}")
            continue
        rows.append(with_prompt(row, prompt, label))
    if dropped:
        warnings.warn(f"{path}: dropped {len(dropped)} row(s) whose tests cannot be used, e.g. {dropped[0][:200]}",
                      stacklevel=3)
    return to_dataset(rows, path, ("prompt", "label"))


def load_taco(path: str | Path, skip_invalid: bool = True):
    """TACO (`question`, `input_output`, `starter_code`); stdin or call-based (fn_name) tests."""
    return _load(path, ("question", "input_output"), lambda r: _taco_row(r, "taco"), skip_invalid)


def load_apps(path: str | Path, skip_invalid: bool = True):
    """APPS (`question`, `input_output`, `starter_code`); call-based problems may use `class Solution`."""
    return _load(path, ("question", "input_output"), lambda r: _taco_row(r, "apps"), skip_invalid)


def load_livecodebench(path: str | Path, skip_invalid: bool = True):
    """LiveCodeBench code_generation(_lite): the label holds the decoded public + private cases and fn_name."""
    return _load(path, ("question_content", "public_test_cases"), _lcb_row, skip_invalid)


def load_codecontests(path: str | Path, splits: Sequence[str] = CODECONTESTS_SPLITS, skip_invalid: bool = True):
    """CodeContests (`description`, test splits); `splits` picks which test splits the label keeps."""
    bad = [s for s in splits if s not in CODECONTESTS_SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {CODECONTESTS_SPLITS}, got {list(splits)}")
    return _load(path, ("description",), lambda r: _codecontests_row(r, splits), skip_invalid)


def load_mbpp(path: str | Path, skip_invalid: bool = True):
    """MBPP, original (`text`) or sanitized (`prompt`, `test_imports`); the prompt shows the asserts."""
    return _load(path, ("test_list",), _mbpp_row, skip_invalid)


def load_kodcode(path: str | Path, skip_invalid: bool = True):
    """KodCode (`question`, `test`: pytest functions importing from `solution`)."""
    return _load(path, ("question", "test"), _kodcode_row, skip_invalid)


_LOADERS: dict[str, Callable[..., Any]] = {"taco": load_taco, "apps": load_apps, "livecodebench": load_livecodebench,
                                           "codecontests": load_codecontests, "mbpp": load_mbpp,
                                           "kodcode": load_kodcode}


def detect_format(row: dict) -> str:
    """The dataset a row comes from, by its fields."""
    if "input_output" in row:
        return "apps" if "problem_id" in row else "taco"
    if "public_test_cases" in row:
        return "livecodebench"
    if any(k in row for k in CODECONTESTS_SPLITS):
        return "codecontests"
    if "test_list" in row:
        return "mbpp"
    if "test" in row and "question" in row:
        return "kodcode"
    raise ValueError(f"cannot tell the code dataset from fields {sorted(row)}; pass format= one of {sorted(_LOADERS)}")


def load_code_dataset(path: str | Path, format: str | None = None, **kw: Any):
    """Any supported code dataset; `format` one of taco, apps, livecodebench, codecontests, mbpp, kodcode."""
    if format is None:
        rows = read_rows(path)
        if not rows:
            raise ValueError(f"{path}: no rows")
        format = detect_format(rows[0])
    if format not in _LOADERS:
        raise ValueError(f"format must be one of {sorted(_LOADERS)}, got {format!r}")
    return _LOADERS[format](path, **kw)
