"""Verifiable tasks for the GRPO loop: the synthetic long-chain lookup (any length) and JSONL math prompts.

Chain task: the prompt lists many variable assignments in random order — `x12 = x7 ; x3 = 5 ; x7 = x3 ; ...` —
and asks for the value of one variable. The answer follows the chain hop by hop, `x12 = x7 = x3 = 5`, and every
hop must find its variable's assignment somewhere far back in the prompt: exactly the long-range lookup a sparse
KV budget can miss. Length grows with `num_vars`, difficulty with `hops`. Sample `i` is a pure function of
`(seed, i)`, so a data cursor (the next index) is all a checkpoint needs to resume the same batches.
"""

from __future__ import annotations

import inspect
import random
import re
from dataclasses import dataclass, field
from typing import Protocol

from sparrow_sgl.config import ConfigError


@dataclass(slots=True)
class TaskSample:
    prompt: str  # user message (the chat template is applied by `encode_prompt`)
    answer: str  # reference final answer
    reference: str = ""  # an ideal response (for supervised warm-up); "" when unknown
    meta: dict = field(default_factory=dict)


class Task(Protocol):
    name: str

    def sample(self, index: int) -> TaskSample: ...

    def score(self, response: str, sample: TaskSample) -> float: ...


FILLER_WORDS = ("la", "mo", "ri", "ne", "tu", "ka", "so", "pe", "di", "vo", "gu", "ba")


def _span(value, name: str) -> tuple[int, int]:
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ConfigError(f"{name} must be an int or [low, high], got {value}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


@dataclass(slots=True)
class ChainTask:
    """Long list of assignments, then a question whose answer chains through `hops` of them."""

    num_vars: int | list[int] = 64  # assignments in the prompt, or [low, high] drawn per sample
    hops: int = 3  # variable-to-variable links before the number
    num_values: int = 10  # the chain ends in a number 0 .. num_values - 1
    partial: bool = True  # reward = fraction of the chain restated correctly (else 1 only for the right number)
    filler: int | list[int] = 0  # filler words after each assignment (or [low, high]): length without more variables
    seed: int = 0
    name: str = "chain"

    def __post_init__(self) -> None:
        low, high = self.var_range
        if not 1 <= self.hops or low < self.hops + 1 or high < low:
            raise ConfigError(
                f"chain task needs num_vars >= hops + 1 >= 2, got num_vars={self.num_vars}, hops={self.hops}"
            )
        if self.num_values < 2:
            raise ConfigError(f"chain task needs num_values >= 2, got {self.num_values}")
        if _span(self.filler, "filler")[0] < 0:
            raise ConfigError(f"chain task needs filler >= 0 words, got {self.filler}")

    @property
    def var_range(self) -> tuple[int, int]:
        return _span(self.num_vars, "num_vars")

    def sample(self, index: int) -> TaskSample:
        rng = random.Random(self.seed * 1_000_003 + index)
        n = rng.randint(*self.var_range)
        names = [f"x{i}" for i in rng.sample(range(max(self.var_range[1], 10)), n)]
        chain, rest = names[: self.hops + 1], names[self.hops + 1 :]
        value = str(rng.randrange(self.num_values))
        rhs = {chain[i]: chain[i + 1] for i in range(self.hops)}
        rhs[chain[-1]] = value
        for i, var in enumerate(rest):  # distractors: a number, or a variable defined before them (no cycles)
            pool = chain + rest[:i]
            rhs[var] = str(rng.randrange(self.num_values)) if rng.random() < 0.5 else rng.choice(pool)
        order = list(rhs)
        rng.shuffle(order)
        low, high = _span(self.filler, "filler")
        lines = []
        for v in order:
            words = " ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(low, high)))
            lines.append(f"{v} = {rhs[v]}" + (f" ; {words}" if words else ""))
        listing = " ; ".join(lines)
        prompt = f"{listing} .\nfind {chain[0]}"
        reference = " = ".join([*chain, value])
        return TaskSample(prompt, value, reference, {"chain": [*chain, value], "num_vars": n})

    def score(self, response: str, sample: TaskSample) -> float:
        """Partial: the fraction of the chain (asked variable, each hop, the number) restated correctly, in order,
        before the first mistake. Exact (`partial=False`): 1 for the right final number, else 0."""
        truth = sample.meta["chain"]
        said = re.findall(r"x\d+|\d+", response.split("\n")[0])
        if not self.partial:
            return 1.0 if said and said[-1] == truth[-1] else 0.0
        correct = 0
        for got, want in zip(said, truth):
            if got != want:
                break
            correct += 1
        return correct / len(truth)

    def corpus(self, count: int = 64) -> list[str]:
        """Task text (prompts + ideal responses) to train a small tokenizer on."""
        return [f"{s.prompt}\n{s.reference}" for s in map(self.sample, range(count))]


@dataclass(slots=True)
class JsonlMathTask:
    """Rows `{"prompt" | "question" | "problem": ..., "answer": ...}` from a JSONL file (GSM8K's and MATH-500's
    shipped files under rewards/data/ fit), scored by the math reward (math-verify)."""

    path: str
    name: str = "jsonl-math"
    rows: list = field(default_factory=list)

    PROMPT_FIELDS = ("prompt", "question", "problem")

    def __post_init__(self) -> None:
        from sparrow_sgl.jsonio import read_jsonl

        numbered = read_jsonl(self.path, "task file")
        if not numbered:
            raise ConfigError(f"task file {self.path} holds no rows")
        for line_no, row in numbered:
            if not isinstance(row, dict) or "answer" not in row or not self._prompt_field(row):
                raise ConfigError(
                    f"{self.path}:{line_no}: a task row needs 'answer' and one of {', '.join(self.PROMPT_FIELDS)}"
                )
        self.rows = [row for _, row in numbered]

    def _prompt_field(self, row: dict) -> str | None:
        return next((name for name in self.PROMPT_FIELDS if name in row), None)

    def sample(self, index: int) -> TaskSample:
        row = self.rows[index % len(self.rows)]
        return TaskSample(str(row[self._prompt_field(row)]), str(row["answer"]), str(row.get("reference", "")))

    def score(self, response: str, sample: TaskSample) -> float:
        from rewards.math import score

        return float(score(response, sample.answer))


def build_task(spec: str, args: dict | None = None, seed: int = 0) -> Task:
    """`chain` (with `args` as ChainTask fields) or a path to a JSONL file of prompts and answers."""
    args = dict(args or {})
    if spec == "chain":
        args.setdefault("seed", seed)
        _check_task_args(ChainTask, args, "chain task")
        return ChainTask(**args)
    if spec.endswith(".jsonl"):
        _check_task_args(JsonlMathTask, args, f"task {spec}", skip=1)
        return JsonlMathTask(spec, **args)
    raise ConfigError(f"unknown task {spec!r}: use 'chain' or a JSONL file of {{'prompt', 'answer'}} rows")


def _check_task_args(task: type, args: dict, what: str, skip: int = 0) -> None:
    """Unknown task_args keys name themselves and the known ones (not a TypeError about __init__)."""
    known = list(inspect.signature(task).parameters)[skip:]
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ConfigError(f"{what}: unknown task_args {', '.join(unknown)} (known: {', '.join(known)})")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a one-turn chat prompt, ending with the assistant header (no thinking block)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    return tokenizer.encode(rendered, add_special_tokens=False)
