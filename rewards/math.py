"""Math reward: extract the final answer, decide equivalence with math-verify, never hang.

Final answer of a text (response or reference), after dropping `<think>` blocks, is the first that exists of:
the last `\\boxed{...}` / `\\fbox{...}` (nested braces), the last "The (final) answer is X", the last GSM8K `#### X`,
else the whole text when it is short (a bare answer such as `0.5`). A response with none of these scores 0.
Equivalence: `math_verify.parse` on both answers, then `math_verify.verify(gold, pred)`.

Parsing and verification run in worker processes (`KillablePool`) so that a hang is cut by killing the worker, in
any thread: an answer that overruns `timeout_s` scores 0 with reason "timeout".
"""

from __future__ import annotations

import atexit
import logging
import math as _math
import os
import re
import threading
from collections.abc import Sequence

from rewards.pool import KillablePool
from rewards.text import strip_thinking

DEFAULT_TIMEOUT_S = 5.0
_WORKER_MEMORY_MB = 4096  # address-space cap of a verifier process (sympy can blow up on adversarial input)
_BARE_MAX_CHARS = 100  # a reference or response without markers is taken whole only when this short
_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(r"(?i)\bthe\s+(?:final\s+)?answer\s+is\s*:?\s*(.+)")
_HASHES = re.compile(r"####\s*(.+)")
_CLAUSE_END = re.compile(r"\.\s|;\s|,?\s+(?:because|since|so|as|which|where|and\s+so)\b"
                         r"|,\s+(?!and\b|or\b)[A-Za-z]{3,}\b")
_TRAILING_WORDS = re.compile(r"^(.*\d[^A-Za-z]*?)\s+(?:[A-Za-z]{2,}\s*)+$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (braces balanced), or `\\boxed 5` without braces."""
    for m in reversed(list(_BOX.finditer(text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j].strip()
            continue  # unbalanced: try an earlier box
        word = re.match(r"[^\s$]+", text[i:])
        if word:
            return word.group(0)
    return None


def _clean(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    answer = re.sub(r"^\*\*|\*\*$", "", answer).strip()  # markdown bold
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            answer = answer[len(left) : -len(right)].strip()
    answer = answer.rstrip(".").strip()
    if _THOUSANDS.match(answer):  # "1,000" would parse as a tuple
        answer = answer.replace(",", "")
    return answer


def _first_clause(answer: str) -> str:
    """'18. Done' -> '18', '5, since x' -> '5', '18 dollars' -> '18': the answer ends at the first sentence
    break or connective outside brackets; trailing plain words after a number are units."""
    depth = 0
    for i, ch in enumerate(answer):
        depth += (ch in "([{") - (ch in ")]}")
        if depth <= 0 and _CLAUSE_END.match(answer, i):
            answer = answer[:i]
            break
    words = _TRAILING_WORDS.match(answer.strip())
    return words.group(1) if words else answer


def extract_answer(text: str) -> str | None:
    """The final answer of a response or reference (see module docstring), or None when there is none."""
    text = strip_thinking(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    found = _ANSWER_IS.findall(text)
    if found:
        return _clean(_first_clause(_clean(found[-1])))
    found = _HASHES.findall(text)
    if found:
        return _clean(found[-1])
    text = text.strip()
    if text and len(text) <= _BARE_MAX_CHARS:
        return _clean(text)
    return None


def _normalized(answer: str) -> str:
    return re.sub(r"\s+", "", answer).replace("\\left", "").replace("\\right", "").replace("\\!", "")


def _verify_pair(pair: tuple[str, str]) -> tuple[float, str]:
    """math-verify on (pred, gold) answers; runs inside a worker process."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    pred, gold = pair
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=config, parsing_timeout=None)
    if not gold_parsed:
        return 0.0, f"reference answer {gold!r} could not be parsed by math-verify"
    pred_parsed = parse(f"\\boxed{{{pred}}}", extraction_config=config, parsing_timeout=None)
    if not pred_parsed:
        return 0.0, f"response answer {pred!r} could not be parsed by math-verify"
    if verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return 1.0, "equivalent"
    return 0.0, "not equivalent"


def _import_math_verify() -> None:
    import math_verify  # noqa: F401

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning: we kill instead


_verify_pair.warmup = _import_math_verify


def _prepare(response: str, reference: str, shortcut: bool = True) -> tuple[str, str] | tuple[float, str]:
    """(pred, gold) answers to verify, or an early (score, reason)."""
    if not isinstance(response, str) or not isinstance(reference, str):
        raise TypeError(f"response and reference must be str, got {type(response).__name__}, "
                        f"{type(reference).__name__}")
    gold = extract_answer(reference)
    if gold is None:
        gold = _clean(strip_thinking(reference))
    if not gold:
        return 0.0, "empty reference answer"
    pred = extract_answer(response)
    if not pred:
        return 0.0, "no final answer found (no \\boxed{}, 'The answer is', '####', nor a short bare answer)"
    if shortcut and _normalized(pred) == _normalized(gold):
        return 1.0, "identical"
    return pred, gold


class MathScorer:
    """Batch math scoring on a pool of `workers` killable processes (`timeout_s` per answer pair)."""

    def __init__(self, workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, shortcut: bool = True):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self.shortcut = shortcut  # textually identical answers score 1.0 without math-verify
        self.pool = KillablePool("rewards.math:_verify_pair", workers, memory_mb=_WORKER_MEMORY_MB)

    def score_with_reasons(self, responses: Sequence[str], references: Sequence[str],
                           timeout_s: float | None = None) -> list[tuple[float, str]]:
        timeout_s = timeout_s or self.timeout_s
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        prepared = [_prepare(r, g, self.shortcut) for r, g in zip(responses, references)]
        todo = [i for i, p in enumerate(prepared) if isinstance(p[0], str)]
        verified = self.pool.map(
            [prepared[i] for i in todo], timeout_s,
            on_timeout=lambda _: (0.0, f"timeout: math-verify took more than {timeout_s:g} s"),
            on_error=lambda _, msg: (0.0, f"math-verify error: {msg}"),
        )
        for i, result in zip(todo, verified):
            prepared[i] = result
        return [(float(s), str(reason)) for s, reason in prepared]

    def score(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        return [s for s, _ in self.score_with_reasons(responses, references)]

    def close(self) -> None:
        self.pool.close()


_shared: MathScorer | None = None
_shared_lock = threading.Lock()


def _shared_scorer() -> MathScorer:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MathScorer(workers=1)
            atexit.register(_shared.close)
        return _shared


def score_with_reason(response: str, reference: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[float, str]:
    """(1.0 or 0.0, why) for one response; the verification runs in a shared killable worker process."""
    return _shared_scorer().score_with_reasons([response], [reference], timeout_s)[0]


def score(response: str, reference: str) -> float:
    """1.0 when the response's final answer is math-verify-equivalent to the reference's, else 0.0."""
    return score_with_reason(response, reference)[0]


def score_batch_with_reasons(responses: Sequence[str], references: Sequence[str], workers: int | None = None,
                             timeout_s: float = DEFAULT_TIMEOUT_S) -> list[tuple[float, str]]:
    """(score, reason) per pair, verified on `workers` processes (default: min(cpus, 8)), each pair cut at timeout_s."""
    workers = workers or min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, _math.ceil(len(responses) / 8)))  # startup costs more than tiny batches gain
    scorer = MathScorer(workers=workers, timeout_s=timeout_s)
    try:
        return scorer.score_with_reasons(responses, references)
    finally:
        scorer.close()


def score_batch(responses: Sequence[str], references: Sequence[str], workers: int | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> list[float]:
    """Scores (1.0/0.0) of many pairs across processes; see `score_batch_with_reasons`."""
    return [s for s, _ in score_batch_with_reasons(responses, references, workers, timeout_s)]
