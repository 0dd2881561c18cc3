"""JSON files written atomically (a crash never leaves half a file) and read with errors that name the file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sparrow_sgl.errors import ConfigError


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """Write `data` as JSON to a temporary file beside `path`, then rename it over `path`. A failure leaves no
    temporary file and raises the `OSError` with `path` (not the temporary name) as its filename."""
    return _write_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """One JSON value a line, written like `write_json_atomic`: an existing file is replaced once all is written."""
    return _write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a path that cannot become a file: a directory, or a file where a directory goes."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output {path} is a directory, not a file")
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise ConfigError(f"output {path}: {parent} is a file, not a directory")
    return path


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself or its closest existing ancestor: what decides whether `path` can still be created."""
    path = Path(path)
    return next(p for p in (path, *path.parents) if p.exists())


def _write_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a directory", e.filename) from e
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # never made, or its directory cannot be written
            tmp.unlink()
        raise OSError(e.errno, e.strerror, str(path)) from e
    return path


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing file or invalid JSON raises `ConfigError` naming `what` and the path."""
    path = Path(path)
    check_input_file(path, what)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from e


def read_jsonl(path: str | os.PathLike, what: str = "JSON-lines file") -> list[tuple[int, Any]]:
    """(1-based line number, value) of every non-blank line; a bad line raises `ConfigError` naming file and line."""
    path = Path(path)
    check_input_file(path, what)
    rows = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                message = f"{path}:{line_no}: line {line_no} is not valid JSON ({e.msg}, column {e.colno})"
                raise ConfigError(message) from e
    return rows


def check_input_file(path: Path, what: str) -> None:
    """A missing file or a directory given as the file is a `ConfigError` naming `what` and the path."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
