"""Labels say which scorer grades a response and carry its reference; `score_labeled` grades a batch.

Label format (a JSON string, or the parsed dict):
    {"kind": "math", "answer": "<bare answer, boxed solution or GSM8K '#### N' solution>"}
    {"kind": "code", "tests": <any format of `rewards.code_formats`: test code, [{"input", "output"}] cases, a
     TACO/APPS `input_output`, LiveCodeBench cases, CodeContests / MBPP / HumanEval test fields; dict or JSON>,
     "fn_name": "f" (optional, call-based tests), "entry_point": "f" (optional, HumanEval check(candidate)),
     "prefix": "..." (optional, prepended to a program that does not define entry_point), "format": "taco"
     (optional, else detected), "strict": false (optional, exact stdout comparison), "timeout_s": 10 (optional,
     seconds per sandboxed run)}
Any label that is not a JSON object (e.g. "42" or "\\frac12") is a math answer. `parse_label` validates a code
label's tests (a test set that cannot fail is a ValueError). `score_labeled` never raises for one bad item: that
item scores 0 with the reason in `Scored.error`, and the batch goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rewards import code as code_reward
from rewards import math as math_reward
from rewards.code_formats import TestSet, parse_tests

KINDS = ("math", "code")
_PROGRESS_CHUNK = 128  # math pairs per progress update


@dataclass(slots=True)
class Label:
    kind: str
    answer: str | None = None
    tests: TestSet | None = None  # parsed and validated
    entry_point: str | None = None
    prefix: str | None = None
    timeout_s: float | None = None
    fn_name: str | None = None
    format: str | None = None
    strict: bool = False


@dataclass(slots=True)
class Scored:
    score: float  # in [0, 1]
    kind: str
    reason: str  # "equivalent", "not equivalent", "3/4 tests passed", "timeout: ...", "invalid label: ...", ...
    timeout: bool = False
    error: str | None = None  # why the item could not be scored (bad label, scorer failure); its score is 0


def parse_label(label: Any) -> Label:
    """A `Label` from a JSON string, a dict, or a bare math answer (see module docstring); a `Label` as it is."""
    if isinstance(label, Label):
        return label
    if isinstance(label, str):
        try:
            data = json.loads(label)
        except json.JSONDecodeError:
            return Label("math", answer=label)
        if not isinstance(data, dict):
            return Label("math", answer=label)
    elif isinstance(label, dict):
        data = label
    else:
        raise ValueError(f"label must be a JSON string, a dict or a bare math answer, got {type(label).__name__}")
    kind = data.get("kind", "math")
    if kind == "math":
        answer = data.get("answer", data.get("reference"))
        if answer is None:
            raise ValueError(f"math label needs an 'answer': {data!r:.200}")
        return Label("math", answer=str(answer))
    if kind == "code":
        return _code_label(data)
    raise ValueError(f"label kind must be one of {KINDS}, got {kind!r}")


def _optional_str(data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"code label '{key}' must be a string, got {type(value).__name__}")
    return value or None


def _code_label(data: dict) -> Label:
    if data.get("tests") is None:
        raise ValueError(f"code label needs 'tests' (test code, cases or a dataset's test field): {data!r:.200}")
    fn_name, entry_point, fmt = (_optional_str(data, k) for k in ("fn_name", "entry_point", "format"))
    timeout_s = data.get("timeout_s")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or timeout_s <= 0):
        raise ValueError(f"code label 'timeout_s' must be a positive number of seconds, got {timeout_s!r}")
    if not isinstance(data.get("strict", False), bool):
        raise ValueError(f"code label 'strict' must be true or false, got {data['strict']!r}")
    tests = parse_tests(data["tests"], fn_name=fn_name, entry_point=entry_point, format=fmt)
    return Label("code", tests=tests, entry_point=entry_point, prefix=_optional_str(data, "prefix"),
                 timeout_s=timeout_s, fn_name=fn_name, format=fmt, strict=bool(data.get("strict", False)))


def _score_code(response: str, label: Label, timeout_s: float) -> Scored:
    res = code_reward.score_with_details(response, label.tests, label.timeout_s or timeout_s,
                                         entry_point=label.entry_point, prefix=label.prefix, strict=label.strict,
                                         max_workers=1)
    timed_out = "timeout" in res.statuses
    bad = sorted({f"{r.status}: {r.reason}" for r in res.runs if not r.ok})
    reason = f"{res.passed}/{res.total} tests passed" + (f" ({'; '.join(bad)[:200]})" if bad else "")
    broken = [r.reason for r in res.runs if r.status == "error"]  # the sandbox itself failed, not the program
    return Scored(res.score, "code", reason, timed_out, error=f"sandbox error: {broken[0][:300]}" if broken else None)


def _kind_of(label: Any) -> str:
    """The kind a label claims, for reporting an invalid one ("math" when it says nothing readable)."""
    if isinstance(label, str):
        try:
            label = json.loads(label)
        except json.JSONDecodeError:
            return "math"
    kind = label.get("kind", "math") if isinstance(label, dict) else "math"
    return kind if kind in KINDS else "math"


def _invalid(label: Any, error: Exception) -> Scored:
    return Scored(0.0, _kind_of(label), f"invalid label: {error}"[:300], error=f"invalid label: {error}")


def score_labeled(responses: Sequence[str], labels: Sequence[Any], workers: int | None = None,
                  math_timeout_s: float = math_reward.DEFAULT_TIMEOUT_S,
                  code_timeout_s: float = code_reward.DEFAULT_TIMEOUT_S,
                  math_scorer: math_reward.MathScorer | None = None,
                  on_done: Callable[[int], None] | None = None) -> list[Scored]:
    """Grade every response by its label: math pairs on a killable process pool, code runs in the sandbox with
    at most `workers` concurrent runs. `on_done(n)` is called as n more items finish (progress bars)."""
    if len(responses) != len(labels):
        raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
    out: list[Scored | None] = [None] * len(labels)
    parsed: list[Label | None] = [None] * len(labels)
    for i, label in enumerate(labels):
        try:
            parsed[i] = parse_label(label)
        except (ValueError, TypeError) as e:
            out[i] = _invalid(label, e)
            continue
        if not isinstance(responses[i], str):
            error = f"invalid response: expected str, got {type(responses[i]).__name__}"
            out[i], parsed[i] = Scored(0.0, parsed[i].kind, error, error=error), None
    if on_done and any(out):
        on_done(sum(s is not None for s in out))
    math_idx = [i for i, lab in enumerate(parsed) if lab is not None and lab.kind == "math"]
    code_idx = [i for i, lab in enumerate(parsed) if lab is not None and lab.kind == "code"]
    if math_idx:
        scorer = math_scorer or math_reward.MathScorer(workers=workers, timeout_s=math_timeout_s)
        chunk = _PROGRESS_CHUNK if on_done else len(math_idx)
        try:
            for at in range(0, len(math_idx), chunk):
                idx = math_idx[at : at + chunk]
                results = scorer.score_with_reasons([responses[i] for i in idx], [parsed[i].answer for i in idx],
                                                    math_timeout_s)
                for i, (s, reason) in zip(idx, results):
                    out[i] = Scored(s, "math", reason, reason.startswith("timeout"))
                if on_done:
                    on_done(len(idx))
        finally:
            if math_scorer is None:
                scorer.close()
    if code_idx:
        def one(i: int) -> Scored:
            try:
                result = _score_code(responses[i], parsed[i], code_timeout_s)
            except Exception as e:  # noqa: BLE001 - one item's failure must not sink the batch
                result = Scored(0.0, "code", f"error: {type(e).__name__}: {e}"[:300], error=f"{type(e).__name__}: {e}")
            if on_done:
                on_done(1)
            return result

        if len(code_idx) == 1:  # OpenRLHF calls with one sample, from many threads: no executor per call
            out[code_idx[0]] = one(code_idx[0])
        else:
            with ThreadPoolExecutor(max_workers=max(1, workers or 4), thread_name_prefix="code-reward") as ex:
                for i, result in zip(code_idx, ex.map(one, code_idx)):
                    out[i] = result
    return out  # type: ignore[return-value]
