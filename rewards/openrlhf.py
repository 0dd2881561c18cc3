"""OpenRLHF custom reward function: pass this file's path as `--reward.remote_url /path/to/rewards/openrlhf.py`
(OpenRLHF 0.11.2; older releases called the flag `--remote_rm_url`).

How OpenRLHF 0.11.2 calls it: it loads the file by path (`spec_from_file_location`) inside each rollout engine's
process and calls `reward_func(queries, prompts, labels)` positionally, with one sample per call, from many
threads at once (`asyncio.to_thread`). `queries[i]` is the decoded prompt + response tokens (special tokens kept,
no padding); the prompt tokens may have been left-truncated to fit `max_len`, so the query can start inside
`prompts[i]`, the full prompt text. `labels[i]` is the dataset's `--label_key` column. The response is the query
after its prompt, trailing special tokens removed. Because the reward runs in the engine's process, math-verify
and the code sandbox (this package's `rewards` dependencies) must be installed in the engine's environment (the
SGLang venv), not only in the trainer's.

Labels (see `rewards.labels`): a JSON string `{"kind": "math", "answer": "..."}` or
`{"kind": "code", "tests": ..., ...}`; a label that is not a JSON object is a math answer.

Returns `{"rewards": FloatTensor[N], "scores": FloatTensor[N], "extra_logs": {name: FloatTensor[N]}}`: rewards
drive the advantages, scores (same values here, in [0, 1]) drive dynamic filtering. Every extra log is a numeric
per-sample tensor (OpenRLHF reduces each with `value.flatten()[0].item()`): `correct`, `is_code`, `timeout`,
`response_chars`, `reward_error` and its reason class `reward_error_label` / `reward_error_score` /
`reward_error_input` (OpenRLHF logs them as `train/reward_error*`: the fraction of samples per reason).

It never raises: a sample whose label is bad (`label`: unknown kind, missing answer, a test set that cannot fail),
whose scoring failed (`score`: the scorer crashed or reported an error), or that has no usable input (`input`:
queries, prompts, labels of different lengths or types) scores 0 with `reward_error` = 1.0. The reason's text cannot
travel in `extra_logs` (numbers only), so it goes to the Python logger `rewards.openrlhf` as a WARNING, at most one
line per `SPARROW_REWARD_LOG_EVERY_S` seconds (default 10; the line counts the failures it stands for), in the engine
process's log. OpenRLHF itself would only log an exception at INFO and then fail the step with a misleading error.

Scoring runs in parallel: math pairs share one killable process pool (`SPARROW_REWARD_WORKERS` processes, started
as concurrent calls need them) that serves every calling thread at once; a code sample runs its sandbox in the
calling thread; a call with several samples fans out on one shared thread pool.
Environment knobs: SPARROW_REWARD_WORKERS (processes / concurrent sandbox runs), SPARROW_MATH_TIMEOUT_S,
SPARROW_CODE_TIMEOUT_S (seconds), SPARROW_REWARD_LOG_EVERY_S.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

if __package__ in (None, ""):  # loaded by file path (OpenRLHF's importlib spec_from_file_location)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards.labels import parse_label, score_labeled  # noqa: E402
from rewards.math import MathScorer  # noqa: E402

log = logging.getLogger("rewards.openrlhf")
_TRAILING_SPECIAL = re.compile(r"(?:\s*(?:<\|[A-Za-z0-9_]+\|>|</s>|<pad>|<eos>))+\s*$")
_ASSISTANT_TURN = "<|im_start|>assistant"
_OVERLAP_PROBE = 32  # characters of the query's head looked up in the prompt (left-truncated prompts)
REASONS = ("label", "score", "input")  # why a sample scored 0 with reward_error: its `reward_error_<reason>` log
_scorer: MathScorer | None = None
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _prompt_end(query: str, prompt: str) -> int:
    """Where the prompt ends in the query, or -1. The query may begin inside the prompt (left truncation, whose
    first decoded character can be a broken multi-byte one): then the longest prompt suffix it starts with."""
    at = query.find(prompt)
    if at >= 0:
        return at + len(prompt)
    for skip in range(4):
        head = query[skip : skip + _OVERLAP_PROBE]
        start = prompt.find(head) if head else -1
        while start >= 0:
            if query.startswith(prompt[start:], skip):
                return skip + len(prompt) - start
            start = prompt.find(head, start + 1)
    return -1


def response_of(query: str, prompt: str) -> str:
    """The generated part of a query: what follows the prompt (or the last assistant turn), minus trailing
    special tokens such as <|im_end|> / <|endoftext|> / padding."""
    end = _prompt_end(query, prompt) if prompt else -1
    if end >= 0:
        response = query[end:]
    elif _ASSISTANT_TURN in query:
        response = query.rsplit(_ASSISTANT_TURN, 1)[1]
    else:
        response = query
    return _TRAILING_SPECIAL.sub("", response)


def _workers() -> int:
    return int(os.environ.get("SPARROW_REWARD_WORKERS", min(os.cpu_count() or 1, 8)))


def _shared() -> tuple[MathScorer, ThreadPoolExecutor]:
    """The math pool and the fan-out threads, created once per process and shared by every calling thread."""
    global _scorer, _executor
    with _lock:
        if _scorer is None:
            _scorer = MathScorer(workers=_workers(), timeout_s=float(os.environ.get("SPARROW_MATH_TIMEOUT_S", 5)))
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="reward")
        return _scorer, _executor


class _RateLimitedWarning:
    """WARNING lines to `log`, at most one per `every_s` seconds; a line counts the failures since the last."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._last = -float("inf")
        self._suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every_s:
                self._suppressed += 1
                return
            self._last, suppressed, self._suppressed = now, self._suppressed, 0
        more = f" (+{suppressed} more failures since the last report)" if suppressed else ""
        log.warning("reward_func: sample scored 0 with reward_error=1: %s%s", reason[:500], more)


def _log_every_s() -> float:
    try:
        return float(os.environ.get("SPARROW_REWARD_LOG_EVERY_S", 10))
    except ValueError:  # loading the file must not fail on a typo
        return 10.0


_warn = _RateLimitedWarning(_log_every_s())


class _Outcome:
    """One sample's result (a plain class: a dataclass fails in a module loaded by path, not in sys.modules)."""

    __slots__ = ("score", "is_code", "timeout", "response_chars", "error", "reason")

    def __init__(self, error: str | None = None, reason: str = "input"):
        self.score, self.is_code, self.timeout, self.response_chars = 0.0, False, False, 0
        self.error, self.reason = error, reason  # reason: one of REASONS, meaningful when error is set


def _error_of(scored: Any) -> str | None:
    """A per-item error reported by `score_labeled` (a str `error`, or `error=True` with the reason)."""
    error = getattr(scored, "error", None)
    if isinstance(error, str) and error:
        return error
    return str(scored.reason) if error is True else None


def _check_math_label(label: Any, parsed: Any) -> None:
    """A math label no response can match raises: an empty one (OpenRLHF passes "" when `--data.label_key` is not
    set) or a JSON object cut short (read as a literal answer by `parse_label`)."""
    if parsed.kind != "math":
        return
    if not parsed.answer.strip():
        raise ValueError("the label is empty (is --data.label_key set?)")
    if isinstance(label, str) and label.lstrip().startswith('{"'):
        try:
            json.loads(label)
        except ValueError as e:
            raise ValueError(f"the label looks like a JSON object but is not valid JSON: {e}") from None


def _score_one(query: Any, prompt: Any, label: Any) -> _Outcome:
    """One sample, never raising: failures become an `_Outcome` with `error` set."""
    out = _Outcome()
    try:
        prompt = "" if prompt is None else prompt  # then the response is found after the last assistant turn
        if not isinstance(query, str) or not isinstance(prompt, str):
            raise TypeError(f"query and prompt must be str, got {type(query).__name__}, {type(prompt).__name__}")
        out.reason = "label"
        parsed = parse_label(label)  # parsed once: a code label's tests are parsed and validated here
        _check_math_label(label, parsed)
        out.reason = "score"
        response = response_of(query, prompt)
        out.response_chars = len(response)
        scorer, _ = _shared()
        scored = score_labeled([response], [parsed], workers=1, math_timeout_s=scorer.timeout_s,
                               code_timeout_s=float(os.environ.get("SPARROW_CODE_TIMEOUT_S", 10)),
                               math_scorer=scorer)[0]
        out.is_code, out.timeout = scored.kind == "code", bool(scored.timeout)
        out.error = _error_of(scored)
        score = float(scored.score)
        if out.error is None and not 0.0 <= score <= 1.0:
            out.error = f"scorer returned {score!r}, outside [0, 1]"
        out.score = 0.0 if out.error else score
    except Exception as e:  # a bad label or a crashing scorer costs this sample only
        out.score, out.error = 0.0, f"{type(e).__name__}: {e}"
    if out.error:
        _warn(f"{out.error} (label {label!r:.200})")
    return out


def _score_all(queries: Sequence[Any], prompts: Sequence[Any], labels: Sequence[Any]) -> list[_Outcome]:
    n = len(queries)
    missing = None if len(prompts) == len(labels) == n else (
        f"queries, prompts, labels differ in length: {n}, {len(prompts)}, {len(labels)}")
    if missing:
        _warn(missing)
        return [_Outcome(error=missing) for _ in range(n)]
    if n == 1:  # OpenRLHF's case: the calling thread scores it; concurrency comes from its many threads
        return [_score_one(queries[0], prompts[0], labels[0])]
    _, executor = _shared()
    return list(executor.map(_score_one, queries, prompts, labels))


def _length(xs: Any) -> int:
    try:
        return len(xs)
    except Exception:
        return 1


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict:
    """OpenRLHF's custom reward contract (see module docstring); never raises, extra keyword arguments ignored."""
    import torch

    try:
        outcomes = _score_all(queries, prompts, labels)
    except Exception as e:  # not even the batch could be read
        _warn(f"{type(e).__name__}: {e}")
        outcomes = [_Outcome(error=str(e)) for _ in range(_length(queries))]
    per_sample = lambda xs: torch.tensor([float(x) for x in xs], dtype=torch.float32)
    values = per_sample([o.score for o in outcomes])
    extra_logs = {
        "correct": per_sample([o.score == 1.0 for o in outcomes]),
        "is_code": per_sample([o.is_code for o in outcomes]),
        "timeout": per_sample([o.timeout for o in outcomes]),
        "response_chars": per_sample([o.response_chars for o in outcomes]),
        "reward_error": per_sample([o.error is not None for o in outcomes]),
        **{f"reward_error_{r}": per_sample([o.error is not None and o.reason == r for o in outcomes]) for r in REASONS},
    }
    return {"rewards": values, "scores": values.clone(), "extra_logs": extra_logs}
