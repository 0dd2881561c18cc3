"""`--sparrow.*` and `--sglang.*` flags, added to OpenRLHF's own parser, and their validation.

OpenRLHF's `hierarchize` turns the dotted names into `args.sparrow.*` / `args.sglang.*`, which reach every actor
through `strategy.args`. Engine counts, tensor parallel size, memory fraction and sleep stay OpenRLHF's `--vllm.*`.
`check(args)` runs on the flat namespace right after parsing, before Ray or any device is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from dataclasses import dataclass, field, fields

from distill.config import DistillConfig
from sparrow_sgl.config import ConfigError
from sparrow_sgl.engine.sampling_params import MAX_LOGPROBS_TOPK
from sparrow_sgl.openrlhf.inputs import check_inputs, check_openrlhf, sleep_enabled, sleep_warning

ENGINES = ("sglang", "embedded")
PAGE_SIZE = 16  # KV page size of both engines (SGLang runs with --page-size 16)


@dataclass(slots=True)
class SparrowFlags:
    engine: str = "sglang"  # rollout engine behind OpenRLHF's engine actors
    schedule: str = "dense"  # preset name, fixed:N, dense or a schedule JSON path
    tau: float = 0.86  # tail threshold (TailGuard, bins_below_tau)
    quantile: float = 0.05  # the tail statistic: this quantile of the acceptance rate per bin
    bin_tokens: int = 2048  # position bin width of the tail statistic
    topk: int = 0  # rollout top-k log-probs per token (tails need >= 1); 0 = no tails
    guard: bool = False  # TailGuard moves the engines' schedule between steps
    sync_timeout: float = 600.0  # seconds any weight-sync call may take before the run fails closed
    canary_tokens: int = 8  # greedy canary length checked after every weight sync (0 = off)
    canary_atol: float = 0.05  # max |log-prob difference| engine vs trainer on the canary
    ipc_bucket_mb: float = 512.0  # colocated CUDA-IPC sync: MiB per bucket (0 = OpenRLHF's one call per parameter)
    out_dir: str | None = None  # events/canary JSON lines (default: <--ckpt.path>/sparrow)
    dry_run: bool = False  # print the resolved configuration and exit
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"--sparrow.engine must be one of {ENGINES}, got {self.engine!r}")
        if not 0.0 < self.tau < 1.0 or not 0.0 < self.quantile < 1.0:
            raise ConfigError(f"--sparrow.tau and .quantile must lie in (0, 1), got {self.tau}, {self.quantile}")
        if not 0 <= self.topk <= MAX_LOGPROBS_TOPK:
            raise ConfigError(f"--sparrow.topk must lie in [0, {MAX_LOGPROBS_TOPK}], got {self.topk}")
        if self.bin_tokens < 1 or self.canary_tokens < 0:
            raise ConfigError(f"--sparrow.bin_tokens must be >= 1 and --sparrow.canary_tokens >= 0, got "
                              f"{self.bin_tokens}, {self.canary_tokens}")
        if not 0.0 < self.sync_timeout < math.inf:  # nan and inf fail only at the first sync, after model loading
            raise ConfigError(f"--sparrow.sync_timeout must be a finite number of seconds > 0, got {self.sync_timeout}")
        if not 0.0 <= self.canary_atol < math.inf:  # nan would let every canary pass, a negative one fail
            raise ConfigError(f"--sparrow.canary_atol must be a finite number >= 0, got {self.canary_atol}")
        if not (0.0 <= self.ipc_bucket_mb < math.inf) or 0 < self.ipc_bucket_mb * 2**20 < 1:
            raise ConfigError(f"--sparrow.ipc_bucket_mb must be 0 (one call per parameter) or a finite number of "
                              f"MiB of at least one byte (2^-20), got {self.ipc_bucket_mb}")


@dataclass(slots=True)
class SGLangFlags:
    url: str | None = None  # comma-separated URLs of running `sparrow serve` servers, one per engine
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (float32 on CPU) | float32 | bfloat16 | float16
    kv_tokens: int | None = None  # KV pool size in tokens
    cuda_graph: bool = True  # decode CUDA graphs (GPU)
    startup_timeout: float = 600.0
    request_timeout: float = 3600.0  # one /generate call
    extra_args: str = ""  # extra SGLang server flags, one string
    log_dir: str | None = None  # server logs (default: <out_dir>/sglang)

    def __post_init__(self) -> None:  # each of these failed only inside the engine actors, after Ray started
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--sglang.device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--sglang.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_tokens is not None and self.kv_tokens < 1:
            raise ConfigError(f"--sglang.kv_tokens must be >= 1, got {self.kv_tokens}")
        for name in ("startup_timeout", "request_timeout"):
            if not 0.0 < getattr(self, name) < math.inf:
                raise ConfigError(f"--sglang.{name} must be a finite number of seconds > 0, got {getattr(self, name)}")
        if self.url is not None and not all(u.strip() for u in self.url.split(",")):
            raise ConfigError(f"--sglang.url has an empty entry: {self.url!r}")
        try:
            shlex.split(self.extra_args)
        except ValueError as e:
            raise ConfigError(f"--sglang.extra_args {self.extra_args!r}: {e}") from None


def _add(parser: argparse.ArgumentParser, prefix: str, f: dataclasses.Field, default) -> None:
    name = f"--{prefix}.{f.name}"
    if isinstance(default, bool):
        parser.add_argument(name, type=_parse_bool, nargs="?", const=True, default=default, metavar="BOOL")
    elif isinstance(default, tuple):
        parser.add_argument(name, type=str, nargs="+", default=list(default))
    else:
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        parser.add_argument(name, type=kind, default=default)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add `--sparrow.*`, `--sparrow.distill.*` and `--sglang.*` (defaults from the dataclasses)."""
    group = parser.add_argument_group("sparrow-sgl")
    for f in fields(SparrowFlags):
        if f.name != "distill":
            _add(group, "sparrow", f, getattr(SparrowFlags(), f.name))
    for f in fields(DistillConfig):
        _add(group, "sparrow.distill", f, getattr(DistillConfig(), f.name))
    for f in fields(SGLangFlags):
        _add(group, "sglang", f, getattr(SGLangFlags(), f.name))


def _section(args, prefix: str, cls) -> dict:
    flat = vars(args) if isinstance(args, argparse.Namespace) else args
    return {f.name: flat[f"{prefix}.{f.name}"] for f in fields(cls) if f"{prefix}.{f.name}" in flat}


def sparrow_from_flat(args) -> SparrowFlags:
    distill = DistillConfig(**_section(args, "sparrow.distill", DistillConfig))
    return SparrowFlags(**{**_section(args, "sparrow", SparrowFlags), "distill": distill})


def sglang_from_flat(args) -> SGLangFlags:
    return SGLangFlags(**_section(args, "sglang", SGLangFlags))


def from_hierarchical(args) -> tuple[SparrowFlags, SGLangFlags]:
    """The two configs from OpenRLHF's nested `strategy.args` (inside any actor)."""
    sparrow = vars(args.sparrow).copy()
    sparrow["distill"] = vars(sparrow["distill"])
    return from_dicts(sparrow, vars(args.sglang))


def from_dicts(sparrow: dict, sglang: dict) -> tuple[SparrowFlags, SGLangFlags]:
    """The inverse of `to_dict` (how the configs travel to the engine actors)."""
    sparrow = dict(sparrow)
    sparrow["distill"] = DistillConfig(**sparrow["distill"])
    return SparrowFlags(**sparrow), SGLangFlags(**sglang)


def check(args: argparse.Namespace) -> tuple[SparrowFlags, SGLangFlags]:
    """Our flags, their combination with OpenRLHF's, and what OpenRLHF itself would assert on; raises ConfigError
    with the reason. Prints a one-line warning where OpenRLHF drops a flag (--vllm.enable_sleep)."""
    sparrow, sgl = sparrow_from_flat(args), sglang_from_flat(args)
    flat = vars(args)
    from sparrow_sgl.schedule import resolve_schedule

    schedule = resolve_schedule(sparrow.schedule)
    if schedule.page_size != PAGE_SIZE:
        raise ConfigError(f"--sparrow.schedule {sparrow.schedule}: page_size {schedule.page_size}, but the rollout "
                          f"engines use {PAGE_SIZE}-token KV pages")
    check_inputs(flat, local_model=sparrow.engine == "embedded" or sgl.url is None)
    engines = flat.get("vllm.num_engines") or 0
    if engines < 1:
        raise ConfigError("sparrow-sgl serves OpenRLHF's rollout engines: set --vllm.num_engines >= 1")
    if flat.get("vllm.sync_with_ray"):
        raise ConfigError("--vllm.sync_with_ray is not supported: weights go over a torch process group")
    check_openrlhf(flat)
    if sparrow.engine == "embedded":
        if flat.get("vllm.tensor_parallel_size", 1) != 1:
            raise ConfigError("--sparrow.engine embedded runs one device per engine: --vllm.tensor_parallel_size 1")
        set_sglang = [f.name for f in fields(SGLangFlags) if getattr(sgl, f.name) != getattr(SGLangFlags(), f.name)]
        if set_sglang:
            raise ConfigError(f"--sglang.{set_sglang[0]} needs --sparrow.engine sglang (engine is embedded)")
    if sgl.url is not None and len(sgl.url.split(",")) != engines:
        raise ConfigError(f"--sglang.url names {len(sgl.url.split(','))} servers for {engines} engines")
    if sparrow.guard and (schedule.is_dense or sparrow.topk < 1):
        raise ConfigError("--sparrow.guard needs a sparse --sparrow.schedule and --sparrow.topk >= 1 (live tails)")
    set_distill = [f.name for f in fields(DistillConfig)
                   if getattr(sparrow.distill, f.name) != getattr(DistillConfig(), f.name)]
    if set_distill and not sparrow.distill.enabled:  # else the run silently trains without DistillSparse
        raise ConfigError(f"--sparrow.distill.{set_distill[0]} needs --sparrow.distill.enabled")
    if sparrow.distill.enabled:
        if schedule.is_dense:
            raise ConfigError("--sparrow.distill.enabled needs a sparse --sparrow.schedule")
        if flat.get("ds.lora.rank", 0):
            raise ConfigError("--sparrow.distill.enabled trains a rollout-only LoRA: leave --ds.lora.rank at 0")
        _check_distill(sparrow, flat)
    if warning := sleep_warning(flat):
        print(warning, file=sys.stderr)
    return sparrow, sgl


def _check_distill(sparrow: SparrowFlags, flat: dict) -> None:
    """DistillSparse runs on the actor group between the policy update and the weight sync (distill_hook.py)."""
    cfg = sparrow.distill
    if cfg.kl_mode != "k3":
        raise ConfigError("--sparrow.distill.kl_mode: inside OpenRLHF only k3 (the dense log-probs of the sampled "
                          "tokens, which OpenRLHF already computed; full distributions are never kept)")
    if flat.get("algo.advantage.is_correction_level", "off") == "off":
        raise ConfigError("--sparrow.distill.enabled needs the rollout log-probs: set "
                          "--algo.advantage.is_correction_level token (or seq)")
    if flat.get("train.async_enable"):
        raise ConfigError("--sparrow.distill.enabled runs between the policy update and the weight sync: "
                          "leave --train.async_enable off")
    if flat.get("ds.zero_stage", 0) == 3:
        raise ConfigError("--sparrow.distill.enabled shares the policy's full weights with the LoRA: "
                          "--ds.zero_stage <= 2")
    if sparrow.guard:
        raise ConfigError("--sparrow.guard and --sparrow.distill.enabled would both move the engines' schedule from "
                          "different processes: DistillSparse's re-planner (--sparrow.distill.replan_every) does it")
    if cfg.replan_every and sparrow.engine != "embedded":
        raise ConfigError("--sparrow.distill.replan_every > 0 measures tails by sparse teacher forcing, which only "
                          "--sparrow.engine embedded offers: set --sparrow.distill.replan_every 0 with SGLang engines")
    if cfg.replan_every and sleep_enabled(flat):
        raise ConfigError("--sparrow.distill.replan_every > 0 generates on engine 0 during training: leave "
                          "--vllm.enable_sleep off")


def to_dict(sparrow: SparrowFlags, sgl: SGLangFlags) -> dict:
    return {"sparrow": dataclasses.asdict(sparrow), "sglang": dataclasses.asdict(sgl)}
