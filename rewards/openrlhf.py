"""OpenRLHF custom reward function: pass this file as `--remote_rm_url` (`--reward.remote_url` in newer releases).

OpenRLHF imports the file and calls `reward_func(queries, prompts, labels)` on a batch: `queries[i]` is the decoded
prompt + response (special tokens kept, possibly left padding), `prompts[i]` the prompt text, `labels[i]` the
dataset's `--label_key` column. The response is the query after its prompt, trailing special tokens removed.

Labels (see `rewards.labels`): a JSON string `{"kind": "math", "answer": "..."}` or
`{"kind": "code", "tests": "<test code>" | [{"input": ..., "output": ...}], "entry_point": "f"}`; a label that is
not a JSON object is a math answer.

Returns `{"rewards": FloatTensor[N], "scores": FloatTensor[N], "extra_logs": {name: FloatTensor[N]}}`: rewards
drive the advantages, scores (same values here, in [0, 1]) drive dynamic filtering, and every extra log is
per-sample because OpenRLHF concatenates and splits them along the batch like the rewards.
Environment knobs: SPARROW_REWARD_WORKERS (processes / concurrent sandbox runs), SPARROW_MATH_TIMEOUT_S,
SPARROW_CODE_TIMEOUT_S (seconds).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # loaded by file path (OpenRLHF's importlib spec_from_file_location)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards.labels import score_labeled  # noqa: E402
from rewards.math import MathScorer  # noqa: E402

_TRAILING_SPECIAL = re.compile(r"(?:\s*(?:<\|[A-Za-z0-9_]+\|>|</s>|<pad>|<eos>))+\s*$")
_ASSISTANT_TURN = "<|im_start|>assistant"
_scorer: MathScorer | None = None
_lock = threading.Lock()


def response_of(query: str, prompt: str) -> str:
    """The generated part of a query: what follows the prompt (or the last assistant turn), minus trailing
    special tokens such as <|im_end|> / <|endoftext|> / padding."""
    at = query.find(prompt) if prompt else -1
    if at >= 0:
        response = query[at + len(prompt):]
    elif _ASSISTANT_TURN in query:
        response = query.rsplit(_ASSISTANT_TURN, 1)[1]
    else:
        response = query
    return _TRAILING_SPECIAL.sub("", response)


def _math_scorer() -> MathScorer:
    global _scorer
    with _lock:
        if _scorer is None:
            _scorer = MathScorer(workers=_workers(), timeout_s=float(os.environ.get("SPARROW_MATH_TIMEOUT_S", 5)))
        return _scorer


def _workers() -> int:
    return int(os.environ.get("SPARROW_REWARD_WORKERS", min(os.cpu_count() or 1, 8)))


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict:
    """OpenRLHF's custom reward contract (see module docstring); extra keyword arguments are ignored."""
    import torch

    if not (len(queries) == len(prompts) == len(labels)):
        raise ValueError(f"queries, prompts, labels differ in length: {len(queries)}, {len(prompts)}, {len(labels)}")
    responses = [response_of(q, p) for q, p in zip(queries, prompts)]
    scorer = _math_scorer()
    scored = score_labeled(responses, labels, workers=_workers(), math_timeout_s=scorer.timeout_s,
                           code_timeout_s=float(os.environ.get("SPARROW_CODE_TIMEOUT_S", 10)), math_scorer=scorer)
    values = torch.tensor([s.score for s in scored], dtype=torch.float32)
    per_sample = lambda xs: torch.tensor(xs, dtype=torch.float32)
    extra_logs = {
        "correct": per_sample([float(s.score == 1.0) for s in scored]),
        "is_code": per_sample([float(s.kind == "code") for s in scored]),
        "timeout": per_sample([float(s.timeout) for s in scored]),
        "response_chars": per_sample([float(len(r)) for r in responses]),
    }
    return {"rewards": values, "scores": values.clone(), "extra_logs": extra_logs}
