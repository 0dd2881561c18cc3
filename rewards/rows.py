"""Dataset rows from local files (JSON lines, optionally gzipped, or parquet) and the row -> `datasets.Dataset`
helpers shared by the math and code loaders (`rewards.datasets`, `rewards.code_datasets`)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (`.gz` allowed) or a parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    return rows


def to_dataset(rows: list[dict], path: str | Path, required: tuple[str, ...]) -> Dataset:
    """The rows as a `datasets.Dataset`; a row missing a `required` field is a ValueError naming the file and row."""
    from datasets import Dataset

    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks field(s) {missing}; it has {sorted(row)}")
    return Dataset.from_list(rows)


def with_prompt(row: dict, prompt: str, label: dict) -> dict:
    """A copy of the row with `prompt` and the JSON `label` set (a clashing prompt is kept as `original_prompt`)."""
    out = dict(row)
    if "prompt" in out:
        out["original_prompt"] = out.pop("prompt")
    out.update(prompt=prompt, label=json.dumps(label))
    return out
