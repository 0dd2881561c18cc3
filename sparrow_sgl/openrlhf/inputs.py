"""What an OpenRLHF run names on its command line — model, prompt data, reward file — exists and fits, checked
before Ray starts: a typo fails here, not after the models have loaded in every actor."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from sparrow_sgl.config import ConfigError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")  # what OpenRLHF loads as local files


def check_inputs(flat: dict, local_model: bool) -> None:
    """The model, prompt data and reward file the run names exist and fit, so a typo fails here and not after Ray
    started and the models loaded. A Hub name (`org/model`, a Hub dataset) is left to OpenRLHF where it can load
    one: a model only with `--sglang.url` servers (the engines we start load a local directory)."""
    model = flat.get("actor.model_name_or_path")
    if model and (local_model or not _remote_name(model)):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--actor.model_name_or_path {model}: model directory not found")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--actor.model_name_or_path {model}: no config.json, not a Hugging Face model directory")
    for flag in ("data.prompt_dataset", "eval.dataset"):
        for entry in (flat.get(flag) or "").split(","):
            _check_dataset(flag, entry.split("@")[0].strip(), flat.get("data.input_key"), flat.get("data.label_key"))
    reward = (flat.get("reward.remote_url") or "").split(",")[0].strip()
    if reward.endswith(".py"):  # OpenRLHF loads its `reward_func` in every engine (agent.py:198-205)
        _check_reward_file(reward)


def _remote_name(name: str) -> bool:
    """A Hub name (`model`, `org/model`) rather than a local path."""
    return not Path(name).expanduser().exists() and not name.startswith(("/", ".", "~")) and name.count("/") <= 1


def _check_dataset(flag: str, name: str, input_key: str | None, label_key: str | None) -> None:
    if not name:
        return
    path = Path(name).expanduser()
    if path.suffix.lower() not in DATA_SUFFIXES and _remote_name(name):
        return
    if not path.exists():
        raise ConfigError(f"--{flag} {name}: not found")
    first = _first_row(path)
    if first is None:
        return
    for key_flag, key in (("--data.input_key", input_key), ("--data.label_key", label_key)):
        if key is not None and key not in first:
            raise ConfigError(f"--{flag} {name}: the first row has no {key_flag} field {key!r} "
                              f"(its fields: {', '.join(map(str, first)) or 'none'})")


def _first_row(path: Path) -> dict | None:
    """The first record of a local JSON-lines or parquet file (None where it cannot be read cheaply)."""
    if path.suffix.lower() == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        return dict.fromkeys(pq.read_schema(path).names)
    if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as f:
        line = next((line for line in f if line.strip()), None)
    if line is None:
        raise ConfigError(f"prompt dataset {path} is empty")
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None  # a pretty-printed JSON document: the datasets library reads it whole
    return row if isinstance(row, dict) else None


def _check_reward_file(path: str) -> None:
    try:
        tree = ast.parse(Path(path).expanduser().read_text(encoding="utf-8"), filename=path)
    except FileNotFoundError:
        raise ConfigError(f"--reward.remote_url {path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"--reward.remote_url {path}: cannot be read as Python: {e}") from None
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    if "reward_func" not in names:
        raise ConfigError(f"--reward.remote_url {path}: defines no top-level reward_func(queries, prompts, labels)")
