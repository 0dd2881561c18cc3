"""`sparrow reward`: score a file of rollouts with the math or code reward.

Input: JSON lines, one rollout per line, with `response` and either
  `label` (the JSON label of `rewards.labels`, or a bare math answer), or
  math: `reference` / `answer` (bare answer, boxed solution or GSM8K '#### N' solution),
  code: `tests` (any format of `rewards.code_formats`: test code, [{"input", "output"}] cases, TACO/APPS
  `input_output`, LiveCodeBench cases, CodeContests / MBPP / HumanEval test fields) and optional `fn_name`,
  `entry_point`, `prefix`, `format`, `strict`, `timeout_s`.
Output: accuracy (fraction of items scoring 1.0), mean score, a per-item table with each item's reason, and the
number of items that could not be scored (an invalid label, e.g. tests that cannot fail: score 0, reason shown);
`--json` prints one JSON object instead. Exit code 0 when the file was read (invalid items included), 2 on bad
input (unreadable file, a row without a response or label).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_SHOW_ERRORS = 20  # items whose error is printed after the table


_INPUT_FORMAT = """\
input (--file): JSON lines, one rollout per line, with a string `response` and one of
  label       a JSON label: {"kind": "math", "answer": "..."} or {"kind": "code", "tests": ..., "fn_name": ...};
              any other string is a math answer (what `sparrow generate` copies from a dataset row)
  reference / answer   math: a bare answer, a boxed solution or a GSM8K '#### N' solution
  tests       code: Python test code, [{"input", "output"}] cases, TACO/APPS input_output, LiveCodeBench cases,
              CodeContests / MBPP / HumanEval test fields; optional fn_name, entry_point, prefix, format, strict
example:
  sparrow generate --model DIR --prompts rewards/data/gsm8k/test.jsonl --num-prompts 8 --out rollouts.jsonl
  sparrow reward --file rollouts.jsonl
rows and items are numbered from 1; an item that cannot be scored (tests that cannot fail, ...) scores 0 and
its reason is printed."""


def _at_least(low: float, kind: type = int):
    """An argparse type: a number of `kind` >= low (a negative --limit silently dropped the last rows)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{text} is below {low}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _INPUT_FORMAT
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--file", required=True, type=Path, help="rollouts.jsonl (format below)")
    parser.add_argument("--kind", choices=("math", "code"), default=None,
                        help="scorer for rows without a JSON label (default: math)")
    parser.add_argument("--workers", type=_at_least(1), default=None, help="processes / concurrent sandbox runs")
    parser.add_argument("--timeout", type=_at_least(1e-3, float), default=None,
                        help="seconds per math verification (default 5) or per sandboxed run (default 10)")
    parser.add_argument("--limit", type=_at_least(1), default=None, help="score only the first N rows")
    parser.add_argument("--show", type=_at_least(0), default=50, help="rows of the per-item table to print (0: none)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")


def _label_of(row: dict, kind: str | None, where: str) -> object:
    if "label" in row:
        label = row["label"]
        if kind == "code" and isinstance(label, str) and not label.lstrip().startswith("{"):
            raise ValueError(f"{where}: --kind code needs a JSON label with 'tests', got {label!r:.80}")
        return label
    if kind == "code" or "tests" in row:
        if "tests" not in row:
            raise ValueError(f"{where}: code rows need 'tests' or a JSON 'label'; fields: {sorted(row)}")
        keys = ("tests", "fn_name", "entry_point", "prefix", "format", "strict", "timeout_s")
        return {"kind": "code", **{k: row[k] for k in keys if row.get(k) is not None}}
    for key in ("reference", "answer"):
        if key in row:
            return {"kind": "math", "answer": str(row[key])}
    raise ValueError(f"{where}: no 'label', 'reference', 'answer' or 'tests' field; fields: {sorted(row)}")


def load_rollouts(path: Path, kind: str | None, limit: int | None = None) -> tuple[list[str], list[object]]:
    from rewards.datasets import read_rows

    rows = read_rows(path)[:limit]
    if not rows:
        raise ValueError(f"{path}: no rollouts")
    responses, labels = [], []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 1}"
        if not isinstance(row.get("response"), str):
            raise ValueError(f"{where}: needs a string 'response'; fields: {sorted(row)}")
        responses.append(row["response"])
        labels.append(_label_of(row, kind, where))
    return responses, labels


def run(args: argparse.Namespace) -> int:

    try:
        responses, labels = load_rollouts(args.file, args.kind, args.limit)
    except ValueError as e:
        print(f"sparrow reward: error: {e}", file=sys.stderr)
        return 2
    timeouts = {} if args.timeout is None else {"math_timeout_s": args.timeout, "code_timeout_s": args.timeout}
    start = time.perf_counter()
    try:
        scored = _score_with_progress(responses, labels, args, timeouts)
    except ValueError as e:
        print(f"sparrow reward: error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    n = len(scored)
    summary = {"file": str(args.file), "items": n, "accuracy": sum(s.score == 1.0 for s in scored) / n,
               "mean_score": sum(s.score for s in scored) / n, "timeouts": sum(s.timeout for s in scored),
               "invalid_labels": sum(_invalid_label(s) for s in scored),
               "errors": sum(s.error is not None for s in scored), "elapsed_s": round(elapsed, 3)}
    if args.json:
        items = [{"index": i, "kind": s.kind, "score": s.score, "reason": s.reason, "timeout": s.timeout,
                  "error": s.error} for i, s in enumerate(scored)]
        print(json.dumps({**summary, "per_item": items}))
        return 0
    _print_table(scored, responses, args.show)
    print(f"accuracy: {100 * summary['accuracy']:.1f}% ({sum(s.score == 1.0 for s in scored)}/{n} items), "
          f"mean score: {summary['mean_score']:.3f} (of 1), timeouts: {summary['timeouts']} items, "
          f"invalid labels: {summary['invalid_labels']} items (scored 0), "
          f"other errors: {summary['errors'] - summary['invalid_labels']} items, time: {elapsed:.1f} s")
    errors = [(i, s.error) for i, s in enumerate(scored) if s.error is not None]
    for i, error in errors[:_SHOW_ERRORS]:
        print(f"item {i + 1}: {error}", file=sys.stderr)
    if len(errors) > _SHOW_ERRORS:
        print(f"... and {len(errors) - _SHOW_ERRORS} more items that could not be scored", file=sys.stderr)
    return 0


def _invalid_label(scored) -> bool:
    return scored.error is not None and scored.error.startswith("invalid label")


def _score_with_progress(responses, labels, args, timeouts):
    from rewards.labels import score_labeled

    if args.json or not sys.stderr.isatty() or len(responses) < 20:
        return score_labeled(responses, labels, workers=args.workers, **timeouts)
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("scoring", total=len(responses))
        return score_labeled(responses, labels, workers=args.workers,
                             on_done=lambda k: progress.advance(task, k), **timeouts)


def _print_table(scored, responses, show: int) -> None:
    if show <= 0:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"per-item scores (first {min(show, len(scored))} of {len(scored)} items)")
    for col in ("#", "kind", "score (0-1)", "reason", "response (tail)"):
        table.add_column(col)
    for i, (s, r) in enumerate(zip(scored[:show], responses)):
        tail = " ".join(r.split())[-60:]
        table.add_row(str(i + 1), s.kind, f"{s.score:.2f}", s.reason[:120], tail)
    Console().print(table)
