"""`sparrow reward`: score a file of rollouts with the math or code reward.

Input: JSON lines, one rollout per line, with `response` and either
  `label` (the JSON label of `rewards.labels`, or a bare math answer), or
  math: `reference` / `answer` (bare answer, boxed solution or GSM8K '#### N' solution),
  code: `tests` (test code or [{"input", "output"}] cases) and optional `entry_point`, `prefix`.
Output: accuracy (fraction of items scoring 1.0), mean score, and a per-item table; `--json` prints one JSON
object instead. Exit code 0 on success, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", required=True, type=Path, help="rollouts.jsonl (see `rewards.cli` docstring)")
    parser.add_argument("--kind", choices=("math", "code"), default=None,
                        help="scorer for rows without a JSON label (default: math)")
    parser.add_argument("--workers", type=int, default=None, help="processes / concurrent sandbox runs")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per math verification (default 5) or per sandboxed run (default 10)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument("--show", type=int, default=50, help="rows of the per-item table to print (0: none)")
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
        return {"kind": "code", **{k: row[k] for k in ("tests", "entry_point", "prefix") if row.get(k) is not None}}
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
        where = f"{path}: row {i}"
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
               "elapsed_s": round(elapsed, 3)}
    if args.json:
        items = [{"index": i, "kind": s.kind, "score": s.score, "reason": s.reason, "timeout": s.timeout}
                 for i, s in enumerate(scored)]
        print(json.dumps({**summary, "per_item": items}))
        return 0
    _print_table(scored, responses, args.show)
    print(f"accuracy: {100 * summary['accuracy']:.1f}% ({sum(s.score == 1.0 for s in scored)}/{n} items), "
          f"mean score: {summary['mean_score']:.3f} (of 1), timeouts: {summary['timeouts']} items, "
          f"time: {elapsed:.1f} s")
    return 0


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
        table.add_row(str(i), s.kind, f"{s.score:.2f}", s.reason[:80], tail)
    Console().print(table)
