"""Labels say which scorer grades a response and carry its reference; `score_labeled` grades a batch.

Label format (a JSON string, or the parsed dict):
    {"kind": "math", "answer": "<bare answer, boxed solution or GSM8K '#### N' solution>"}
    {"kind": "code", "tests": "<python test code>" | [{"input": "...", "output": "..."}, ...],
     "entry_point": "f" (optional, HumanEval check(candidate)), "prefix": "..." (optional, prepended to a program
     that does not define entry_point), "timeout_s": 10 (optional, seconds per sandboxed run)}
Any label that is not a JSON object (e.g. "42" or "\\frac12") is a math answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rewards import code as code_reward
from rewards import math as math_reward

KINDS = ("math", "code")
_PROGRESS_CHUNK = 128  # math pairs per progress update


@dataclass(slots=True)
class Label:
    kind: str
    answer: str | None = None
    tests: str | list[dict] | None = None
    entry_point: str | None = None
    prefix: str | None = None
    timeout_s: float | None = None


@dataclass(slots=True)
class Scored:
    score: float  # in [0, 1]
    kind: str
    reason: str  # "equivalent", "not equivalent", "3/4 tests passed", "timeout: ...", ...
    timeout: bool = False


def parse_label(label: Any) -> Label:
    """A `Label` from a JSON string, a dict, or a bare math answer (see module docstring)."""
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
        if data.get("tests") is None:
            raise ValueError(f"code label needs 'tests' (test code or stdin/stdout cases): {data!r:.200}")
        return Label("code", tests=data["tests"], entry_point=data.get("entry_point"), prefix=data.get("prefix"),
                     timeout_s=data.get("timeout_s"))
    raise ValueError(f"label kind must be one of {KINDS}, got {kind!r}")


def _score_code(response: str, label: Label, timeout_s: float) -> Scored:
    res = code_reward.score_with_details(response, label.tests, label.timeout_s or timeout_s,
                                         entry_point=label.entry_point, prefix=label.prefix, max_workers=1)
    timed_out = "timeout" in res.statuses
    bad = sorted({f"{r.status}: {r.reason}" for r in res.runs if not r.ok})
    reason = f"{res.passed}/{res.total} tests passed" + (f" ({'; '.join(bad)[:200]})" if bad else "")
    return Scored(res.score, "code", reason, timed_out)


def score_labeled(responses: Sequence[str], labels: Sequence[Any], workers: int | None = None,
                  math_timeout_s: float = math_reward.DEFAULT_TIMEOUT_S,
                  code_timeout_s: float = code_reward.DEFAULT_TIMEOUT_S,
                  math_scorer: math_reward.MathScorer | None = None,
                  on_done: Callable[[int], None] | None = None) -> list[Scored]:
    """Grade every response by its label: math pairs on a killable process pool, code runs in the sandbox with
    at most `workers` concurrent runs. `on_done(n)` is called as n more items finish (progress bars)."""
    if len(responses) != len(labels):
        raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
    parsed = [parse_label(label) for label in labels]
    out: list[Scored | None] = [None] * len(parsed)
    math_idx = [i for i, lab in enumerate(parsed) if lab.kind == "math"]
    code_idx = [i for i, lab in enumerate(parsed) if lab.kind == "code"]
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
            result = _score_code(responses[i], parsed[i], code_timeout_s)
            if on_done:
                on_done(1)
            return result

        with ThreadPoolExecutor(max_workers=max(1, workers or 4), thread_name_prefix="code-reward") as ex:
            for i, result in zip(code_idx, ex.map(one, code_idx)):
                out[i] = result
    return out  # type: ignore[return-value]
