"""`TrainConfig`: every setting of an embedded GRPO run, loaded from YAML/JSON and overridden with `--set k=v`.

Nested sections (only `distill:` today) are dataclasses too; an override names them with a dot:
`--set distill.every=2`. Values in overrides are parsed as YAML scalars (`1e-5`, `true`, `[1, 2]`, `null`).
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin, get_type_hints

from distill.config import DistillConfig
from sparrow_sgl.config import ConfigError
from sparrow_sgl.jsonio import check_input_file

MISMATCH_MODES = ("full", "topk")
ENGINES = ("embedded", "sglang")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(slots=True)
class TrainConfig:
    # -- model and run ------------------------------------------------------------------------------------------
    model: str = ""  # local HF model dir (policy and rollout engine start from it)
    out_dir: str = "runs/train"
    device: str = "cpu"
    dtype: str = "float32"  # of the trainable policy; the engine follows `engine_dtype`
    engine_dtype: str = "auto"
    seed: int = 0
    steps: int = 10
    # -- task ---------------------------------------------------------------------------------------------------
    task: str = "chain"  # "chain" (synthetic long-chain lookup) or a JSONL file of {"prompt", "answer"} (math reward)
    task_args: dict = field(default_factory=dict)  # keyword arguments of the task (e.g. num_vars, hops)
    prompts_per_step: int = 4
    group_size: int = 8  # samples per prompt (GRPO group)
    # -- rollout ------------------------------------------------------------------------------------------------
    engine: str = "embedded"  # "embedded" (in-process) or "sglang" (a `sparrow serve` server: top-k mismatch only)
    sglang_url: str | None = None  # engine sglang: a running server (None: start one on `model`, stopped at the end)
    schedule: str = "dense"  # "dense", "fixed:N", a preset name or a schedule JSON path
    tailguard: bool = False  # let the TailGuard move budgets from live tails
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    page_size: int = 16
    sink_pages: int = 1
    local_pages: int = 2
    scorer: str = "centroid"
    kv_gb: float | None = None
    # -- optimisation -------------------------------------------------------------------------------------------
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    mini_batches: int = 1  # optimizer steps per rollout batch (>1 makes the PPO ratio move away from 1)
    micro_batch_size: int = 4  # sequences per forward/backward (gradient accumulation over the mini-batch)
    # -- loss ---------------------------------------------------------------------------------------------------
    clip_low: float = 0.2
    clip_high: float = 0.28
    tis_cap: float = 2.0  # C in min(pi_old_dense / pi_rollout, C)
    icepop: bool = False  # zero the tokens whose ratio leaves [icepop_low, icepop_high] instead of truncating
    icepop_low: float = 0.5
    icepop_high: float = 2.0
    entropy_coef: float = 0.0
    # -- monitoring ---------------------------------------------------------------------------------------------
    bin_tokens: int = 2048
    hardware: str = "h100"  # cost-model preset for `sparse/speedup_predicted` (h100, h200, cpu, ...)
    tau: float = 0.86
    quantile: float = 0.05
    mismatch: str = "full"  # acceptance rate over the full vocabulary, or top-k lists ("topk", needs topk > 0)
    topk: int = 20
    noise_floor: bool = True  # once per run: tails of a dense rollout against the trainer (engine numerics)
    plot: bool = True
    progress: bool = True
    # -- checkpoints --------------------------------------------------------------------------------------------
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2
    # -- DistillSparse ------------------------------------------------------------------------------------------
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if isinstance(self.distill, dict):
            self.distill = _build(DistillConfig, self.distill, "distill")
        self.betas = tuple(float(b) for b in self.betas)
        positive = (
            "steps",
            "prompts_per_step",
            "group_size",
            "max_new_tokens",
            "page_size",
            "mini_batches",
            "micro_batch_size",
            "bin_tokens",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.lr <= 0 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"need lr > 0, temperature > 0, 0 < top_p <= 1; got {self.lr}, {self.temperature}, {self.top_p}"
            )
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ConfigError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.tis_cap <= 0 or not 0 < self.icepop_low < 1 < self.icepop_high:
            raise ConfigError("need tis_cap > 0 and 0 < icepop_low < 1 < icepop_high")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "sglang":
            self._check_sglang()
        if self.mismatch not in MISMATCH_MODES:
            raise ConfigError(f"mismatch must be one of {MISMATCH_MODES}, got {self.mismatch!r}")
        if self.mismatch == "topk" and self.topk < 1:
            raise ConfigError("mismatch 'topk' needs topk >= 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 < self.tau < 1 or not 0 < self.quantile < 1:
            raise ConfigError(f"tau and quantile must lie in (0, 1), got {self.tau}, {self.quantile}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.keep_last < 1 or self.grad_clip < 0:
            raise ConfigError("need warmup_steps >= 0, save_every >= 0, keep_last >= 1, grad_clip >= 0")
        batch = self.prompts_per_step * self.group_size
        if batch % self.mini_batches:
            raise ConfigError(f"mini_batches ({self.mini_batches}) must divide the batch of {batch} sequences")

    def _check_sglang(self) -> None:
        """SGLang returns top-k log-probs only (mismatch switches to top-k mode) and keeps 16-token pages."""
        if self.page_size != 16:
            raise ConfigError(f"engine sglang keeps 16-token KV pages; got page_size {self.page_size}")
        if self.mismatch == "full":
            print("train: SGLang returns top-k log-probs only: per-token mismatch uses top-k mode (a lower bound)")
            self.mismatch = "topk"
        if self.distill.enabled and self.distill.replan_every:
            raise ConfigError(
                "engine sglang cannot re-plan DistillSparse schedules (re-planning needs full-vocabulary sparse "
                "scoring); set distill.replan_every=0"
            )

    @property
    def batch_size(self) -> int:
        """Sequences per RL step."""
        return self.prompts_per_step * self.group_size

    # -- I/O ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "train config") -> TrainConfig:
        return _build(cls, data, where)

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
        path = Path(path)
        check_input_file(path, "train config")
        data = _parse_file(path)
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data, where=f"train config {path}")

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def apply_override(data: dict, item: str) -> None:
    """Apply one `key=value` (dotted keys reach into sections) to a config dict, in place."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key=value (e.g. lr=1e-5 or distill.every=2)")
    *parents, leaf = key.strip().split(".")
    node = data
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {name!r} is not a section")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse the value: {_one_line(e)}") from e
    node[leaf] = value


def _as_float(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where} must be a number, got {value!r} (a string)") from None


def _one_line(e: Exception) -> str:
    """A YAML error's position and problem (its own text spans several lines, with a source excerpt)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _parse_file(path: Path) -> dict:
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:
        raise ConfigError(f"train config {path} cannot be parsed: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"train config {path} must hold a mapping, got {type(data).__name__}")
    return data


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    hints = get_type_hints(cls)
    kwargs = {name: typed_value(value, hints[name], f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def typed_value(value, hint, where: str):
    """`value` checked against the field type `hint` (bool, int, float, str, dict, tuple/list, X | None, a nested
    config dataclass); ints are accepted as floats and YAML 1.1's `1e-5` strings are read as floats."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return typed_value(value, inner[0], where) if len(inner) == 1 else value
    if is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, where.replace(": ", ".", 1))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r} ({_kind(value)})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, got {value!r} ({_kind(value)})")
        return value
    if hint is float:
        if isinstance(value, str):
            return _as_float(value, where)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r} ({_kind(value)})")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r} ({_kind(value)})")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r} ({_kind(value)})")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r} ({_kind(value)})")
        fixed = origin is tuple and Ellipsis not in args
        if fixed and len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        item_hints = args if fixed else [args[0] if args else object] * len(value)
        items = [typed_value(v, h, f"{where}[{i}]") if h is not object else v
                 for i, (v, h) in enumerate(zip(value, item_hints))]
        return origin(items)
    return value


def describe_fields(cls, prefix: str = "") -> list[str]:
    """One line per config key: `name: type = default  # the comment beside it in the source` (sections nested)."""
    hints, comments = get_type_hints(cls), _field_comments(cls)
    lines = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        if is_dataclass(default):
            lines += describe_fields(type(default), prefix=f"{prefix}{f.name}.")
            continue
        comment = f"  # {comments[f.name]}" if f.name in comments else ""
        lines.append(f"  {prefix}{f.name}: {type_name(hints[f.name])} = {default!r}{comment}")
    return lines


def _field_comments(cls) -> dict[str, str]:
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$")
    matches = (pattern.match(line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2).strip() for m in matches if m}


def type_name(hint) -> str:
    """A field type as a person reads it: `float | None`, `tuple[float, float]`, `bool`."""
    text = str(hint) if get_origin(hint) else getattr(hint, "__name__", str(hint))
    return text.replace("typing.", "").replace("NoneType", "None")


def _kind(value) -> str:
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )
