"""Prompt sets as HF `datasets.Dataset` from local files, and prompt formatting with a chat template.

Every row gets `prompt` (the question as text), `label` (the JSON label of `rewards.labels`) and keeps its original
fields (a clashing original `prompt` is kept as `original_prompt`). Bundled copies (with their licences) live in
`rewards/data/`: GSM8K test, MATH-500 test, HumanEval; any other split or file is loaded from `path`.
Code datasets as they ship (TACO, APPS, LiveCodeBench, CodeContests, MBPP, KodCode; `load_code_dataset` picks by
fields) load from a local `path` with the loaders of `rewards.code_datasets`, re-exported here.
Files: `.jsonl` / `.json` (JSON lines, optionally `.gz`) or `.parquet`. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rewards.code_datasets import (
    load_apps,
    load_code_dataset,
    load_codecontests,
    load_kodcode,
    load_livecodebench,
    load_mbpp,
    load_taco,
)
from rewards.labels import parse_label
from rewards.math import extract_answer
from rewards.rows import read_rows, to_dataset, with_prompt

DATA_DIR = Path(__file__).resolve().parent / "data"
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python block."


def _math_rows(path: Path) -> list[dict]:
    rows = read_rows(path)
    for i, row in enumerate(rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}: row {i} needs 'question' and 'answer', it has {sorted(row)}")
    out = []
    for row in rows:
        answer = extract_answer(row["answer"]) or row["answer"].strip()
        out.append(with_prompt(row, row["question"], {"kind": "math", "answer": answer}))
    return out


def load_gsm8k(split: str = "test", path: str | Path | None = None):
    """GSM8K (`question`, `answer` ending in '#### N'); only the test split is bundled."""
    path = Path(path) if path else DATA_DIR / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K {split!r} not found at {path} (bundled: test only; pass path=)")
    return to_dataset(_math_rows(path), path, ("prompt", "label"))


def load_math500(path: str | Path | None = None):
    """MATH-500 (`question`, `answer` = solution with \\boxed{}); the label carries the extracted answer."""
    path = Path(path) if path else DATA_DIR / "math500" / "test.jsonl"
    return to_dataset(_math_rows(path), path, ("prompt", "label"))


def load_humaneval(path: str | Path | None = None):
    """HumanEval (`prompt`, `canonical_solution`, `test`, `entry_point`; gzipped JSON lines)."""
    path = Path(path) if path else DATA_DIR / "humaneval" / "HumanEval.jsonl.gz"
    rows = read_rows(path)
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt", "test", "entry_point") if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks field(s) {missing}")
        question = f"{CODE_INSTRUCTION}\n\n```python\n{row['prompt']}```"
        label = {"kind": "code", "tests": row["test"], "entry_point": row["entry_point"], "prefix": row["prompt"]}
        out.append(with_prompt(row, question, label))
    return to_dataset(out, path, ("prompt", "label"))


def load_prompt_label(path: str | Path):
    """A generic file of `{"prompt": str, "label": str | dict}` rows (dict labels are stored as JSON)."""
    path = Path(path)
    rows = read_rows(path)
    for row in rows:
        if isinstance(row.get("label"), dict):
            row["label"] = json.dumps(row["label"])
    return to_dataset(rows, path, ("prompt", "label"))


def format_prompt(tokenizer: Any, question: str, thinking: bool | None = None,
                  instruction: str | None = BOXED_INSTRUCTION) -> str:
    """The model's input text: its chat template when it has one (`thinking` -> Qwen3's `enable_thinking`;
    None keeps the template's default), else a plain 'Question: ...\\nAnswer:' prompt."""
    content = f"{question}\n\n{instruction}" if instruction else question
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    return f"Question: {content}\nAnswer:"


def with_chat_prompts(dataset, tokenizer: Any, thinking: bool | None = None, instruction: str | None = None):
    """The dataset with `prompt` formatted by `format_prompt` and the raw text kept as `question_text`."""
    def fmt(row: dict) -> dict:
        kind = parse_label(row["label"]).kind
        instr = instruction if instruction is not None else (BOXED_INSTRUCTION if kind == "math" else None)
        return {"question_text": row["prompt"], "prompt": format_prompt(tokenizer, row["prompt"], thinking, instr)}

    return dataset.map(fmt)


__all__ = ["read_rows", "load_gsm8k", "load_math500", "load_humaneval", "load_prompt_label", "format_prompt",
           "with_chat_prompts", "load_taco", "load_apps", "load_livecodebench", "load_codecontests", "load_mbpp",
           "load_kodcode", "load_code_dataset"]
