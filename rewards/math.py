"""Math reward: extract the final answer, decide equivalence with math-verify, never hang.

Final answer: see `rewards.math_answer` (the last marked answer by position; several listed answers as one where
the reference has several parts; a short bare answer without words; decimal commas where a single number is expected).
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

from rewards.math_answer import (  # noqa: F401  (extract_answer, has_words, last_boxed: public here too)
    clean,
    decimal_comma,
    extract_answer,
    extract_answers,
    has_words,
    last_boxed,
    parts,
)
from rewards.pool import KillablePool
from rewards.text import strip_thinking

DEFAULT_TIMEOUT_S = 5.0
_WORKER_MEMORY_MB = 4096  # address-space cap of a verifier process (sympy can blow up on adversarial input)
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
    golds = extract_answers(reference) or [clean(strip_thinking(reference))]
    gold = ", ".join(golds)
    if not gold:
        return 0.0, "empty reference answer"
    preds = extract_answers(response)
    if not preds or not preds[-1]:
        return 0.0, ("no final answer found (no \\boxed{}, no marker such as 'The answer is' / 'Answer:' / '####', "
                     "nor a short bare answer without words)")
    several = len(golds) > 1 or parts(gold) > 1  # then boxes listed together in the response are one answer
    pred = ", ".join(preds) if several else decimal_comma(preds[-1], gold)
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
            _shared = MathScorer()  # workers start as concurrent callers need them (min(cpus, 8) at most)
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
