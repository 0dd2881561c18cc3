"""Configuration dataclasses: sparse attention settings and the position-dependent KV budget schedule.

`Schedule` is the JSON contract shared by every engine and trainer (see DESIGN.md §3):
    {"page_size": 16, "bin_tokens": 2048, "budgets": [...], "tau": 0.86, "quantile": 0.05,
     "dense_layers": [0, 1], "model": "..."}
`budgets[i]` is the number of KV tokens each (request, KV head) may attend to while the request's total KV length
lies in bin i (`[i * bin_tokens, (i + 1) * bin_tokens)`); the last entry holds beyond the last bin. `null` means
dense. Budgets count every attended page, including the sink and local pages.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields

from sparrow_sgl.errors import ConfigError
from sparrow_sgl.jsonio import read_json, write_json_atomic

__all__ = ["ConfigError", "SparsityConfig", "Schedule", "EngineConfig", "budget_pages"]

SCORERS = ("centroid", "centroid-bf16", "quest")
CENTROID_SCORERS = ("centroid", "centroid-bf16")
KV_LAYOUTS = ("NHD", "HND")


def _reject_unknown_keys(cls: type, data: dict, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")


@dataclass(slots=True)
class SparsityConfig:
    """How decode attention picks its pages.

    page_size: tokens per KV page (the unit of selection).
    sink_pages / local_pages: first and last pages of a sequence that are always attended.
    scorer: "centroid" (mean key of the page, the paper's choice), "centroid-bf16" (that mean rounded to bf16 before
        it is scored: every path selects the same pages, and the GPU engine scores from a bf16 copy, half the bytes
        of the float32 sums) or "quest" (per-channel min/max upper bound).
    dense_layers: layer indices that always attend densely.
    kv_layout: "NHD" caches are [pages, page_size, kv_heads, head_dim]; "HND" are [pages, kv_heads, page_size, dim].
    """

    page_size: int = 16
    sink_pages: int = 1
    local_pages: int = 2
    scorer: str = "centroid"
    dense_layers: tuple[int, ...] = (0, 1)
    kv_layout: str = "NHD"

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ConfigError(f"page_size must be a positive integer, got {self.page_size!r}")
        if self.sink_pages < 0 or self.local_pages < 0:
            raise ConfigError(f"sink_pages and local_pages must be >= 0, got {self.sink_pages}, {self.local_pages}")
        if self.local_pages < 1:
            raise ConfigError("local_pages must be >= 1: the page holding the current token is always attended")
        if self.scorer not in SCORERS:
            raise ConfigError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ConfigError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        if any(i < 0 for i in self.dense_layers):
            raise ConfigError(f"dense_layers must be non-negative layer indices, got {list(self.dense_layers)}")

    @property
    def reserved_pages(self) -> int:
        return self.sink_pages + self.local_pages

    @property
    def min_budget(self) -> int:
        """Smallest budget in tokens: the sink and local pages."""
        return self.reserved_pages * self.page_size

    @property
    def bf16_centroids(self) -> bool:
        """Whether page centroids are rounded to bf16 before scoring ("centroid-bf16")."""
        return self.scorer == "centroid-bf16"

    def is_dense_layer(self, layer: int | None) -> bool:
        return layer is not None and layer in self.dense_layers


@dataclass(slots=True)
class Schedule:
    """KV budget (tokens per request and KV head) as a step function of the request's total KV length."""

    budgets: list[int | None] = field(default_factory=lambda: [None])
    page_size: int = 16
    bin_tokens: int = 2048
    tau: float = 0.86
    quantile: float = 0.05
    dense_layers: list[int] = field(default_factory=lambda: [0, 1])
    model: str = ""
    name: str = ""
    sink_pages: int = 1
    local_pages: int = 2
    scorer: str = "centroid"

    def __post_init__(self) -> None:
        if not isinstance(self.budgets, list | tuple) or len(self.budgets) == 0:
            raise ConfigError(f"schedule budgets must be a non-empty list, got {self.budgets!r}")
        self.budgets = list(self.budgets)
        if not isinstance(self.bin_tokens, int) or self.bin_tokens < 1:
            raise ConfigError(f"bin_tokens must be a positive integer, got {self.bin_tokens!r}")
        if not (0.0 < float(self.tau) < 1.0):
            raise ConfigError(f"tau must lie in (0, 1), got {self.tau!r}")
        if not (0.0 < float(self.quantile) < 1.0):
            raise ConfigError(f"quantile must lie in (0, 1), got {self.quantile!r}")
        self.dense_layers = [int(i) for i in self.dense_layers]
        sparsity = self.sparsity()  # validates page_size, sink/local pages, scorer
        for i, budget in enumerate(self.budgets):
            if budget is None:
                continue
            if isinstance(budget, bool) or not isinstance(budget, int):
                raise ConfigError(f"budget of bin {i} must be an integer number of tokens or null, got {budget!r}")
            if budget % self.page_size != 0:
                raise ConfigError(
                    f"budget of bin {i} ({budget} tokens) is not a multiple of the page size ({self.page_size}); "
                    f"nearest valid: {_nearest_budgets(budget, self.page_size, sparsity.min_budget)}"
                )
            if budget < sparsity.min_budget:
                raise ConfigError(
                    f"budget of bin {i} ({budget} tokens) is below the {sparsity.reserved_pages} always-kept "
                    f"sink+local pages; the minimum budget is {sparsity.min_budget} tokens"
                )

    # -- queries ------------------------------------------------------------------------------------------------
    def bin_of(self, position: int) -> int:
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        return min(position // self.bin_tokens, len(self.budgets) - 1)

    def budget_at(self, position: int) -> int | None:
        """KV budget in tokens for a request whose total KV length is `position`; None means dense."""
        return self.budgets[self.bin_of(position)]

    @property
    def is_dense(self) -> bool:
        return all(b is None for b in self.budgets)

    def sparsity(self) -> SparsityConfig:
        return SparsityConfig(
            page_size=self.page_size,
            sink_pages=self.sink_pages,
            local_pages=self.local_pages,
            scorer=self.scorer,
            dense_layers=tuple(self.dense_layers),
        )

    def describe(self) -> str:
        parts = []
        for i, b in enumerate(self.budgets):
            start = i * self.bin_tokens
            span = f"{start}+" if i == len(self.budgets) - 1 else f"{start}-{start + self.bin_tokens}"
            parts.append(f"{span}: {'dense' if b is None else f'{b} tok'}")
        return f"{self.name or 'schedule'} [" + ", ".join(parts) + "]"

    # -- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "schedule") -> Schedule:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        _reject_unknown_keys(cls, data, where)
        if "budgets" not in data:
            raise ConfigError(f"{where}: missing required key 'budgets'")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        return cls.from_dict(read_json(path, "schedule file"), where=f"schedule file {path}")

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, **kw) -> Schedule:
        return cls(budgets=[None], name="dense", **kw)

    @classmethod
    def fixed(cls, budget: int, **kw) -> Schedule:
        return cls(budgets=[int(budget)], name=f"fixed:{budget}", **kw)


def _nearest_budgets(budget: int, page_size: int, min_budget: int) -> str:
    """The valid budgets (multiples of the page size, at least the minimum) next to an invalid one, as text."""
    below = max(budget // page_size * page_size, min_budget)
    above = max(-(-budget // page_size) * page_size, min_budget)
    if below == above:
        return f"{below} tokens" + (" (the minimum)" if below == min_budget else "")
    return f"{below} or {above} tokens"


def budget_pages(budget_tokens: int | None, seq_len: int, page_size: int) -> int:
    """Number of pages a request with `seq_len` tokens attends to under `budget_tokens` (None = all)."""
    n_pages = math.ceil(seq_len / page_size)
    if budget_tokens is None:
        return n_pages
    return min(n_pages, budget_tokens // page_size)


def check_device(device: str) -> None:
    """A `cuda` device needs a CUDA build of torch and a visible GPU; the commands call this before loading models."""
    if not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available to this torch ({torch.__version__}); "
                          "use cpu")


ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(slots=True)
class EngineConfig:
    """How the embedded engine loads a model and sizes its paged KV cache.

    model: local HF directory (config.json, safetensors, tokenizer files).
    device: "cpu", "cuda" or "cuda:N". dtype: "auto" = float32 on CPU, bfloat16 on CUDA.
    page_size / sink_pages / local_pages / scorer: the KV page geometry and the sparse-selection defaults used for
        schedules given by name ("dense", "fixed:N"); a `Schedule` object or JSON file brings its own.
    kv_gb: GiB of KV cache (pages + page summaries). None = `gpu_memory_fraction` of free GPU memory on CUDA,
        `DEFAULT_CPU_KV_GB` on CPU. num_kv_pages overrides both with an exact page count (tests, benchmarks).
    gpu_memory_utilization: vLLM's meaning (OpenRLHF's --vllm.gpu_memory_utilization): this engine may hold this
        fraction of the GPU's *total* memory; the KV pool gets it minus what the engine holds already (weights).
        Used on CUDA in place of `gpu_memory_fraction` when set (kv_gb / num_kv_pages still win).
    max_num_seqs: sequences decoded together. max_model_len: prompt + response limit (None = the model's
        max_position_embeddings). max_prefill_tokens: prompt tokens per prefill step (one longer prompt runs alone).
    seed: base seed for sampling when `SamplingParams.seed` is None.
    """

    model: str
    device: str = "cpu"
    dtype: str = "auto"
    page_size: int = 16
    sink_pages: int = 1
    local_pages: int = 2
    scorer: str = "centroid"
    kv_gb: float | None = None
    gpu_memory_fraction: float = 0.8
    gpu_memory_utilization: float | None = None
    max_num_seqs: int = 256
    max_model_len: int | None = None
    seed: int = 0
    num_kv_pages: int | None = None
    max_prefill_tokens: int = 16384

    DEFAULT_CPU_KV_GB = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str | os.PathLike) or not str(self.model):
            raise ConfigError(f"EngineConfig.model must be a local model directory, got {self.model!r}")
        self.model = str(self.model)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in ENGINE_DTYPES:
            raise ConfigError(f"dtype must be one of {ENGINE_DTYPES}, got {self.dtype!r}")
        self.sparsity()  # validates page_size, sink/local pages and scorer
        if self.kv_gb is not None and not self.kv_gb > 0:
            raise ConfigError(f"kv_gb must be > 0 GiB, got {self.kv_gb!r}")
        if not (0.0 < self.gpu_memory_fraction <= 1.0):
            raise ConfigError(f"gpu_memory_fraction must lie in (0, 1], got {self.gpu_memory_fraction!r}")
        if self.gpu_memory_utilization is not None and not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ConfigError(f"gpu_memory_utilization must lie in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2 tokens, got {self.max_model_len}")
        if self.num_kv_pages is not None and self.num_kv_pages < 1:
            raise ConfigError(f"num_kv_pages must be >= 1, got {self.num_kv_pages}")
        if self.max_prefill_tokens < 1:
            raise ConfigError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")

    def sparsity(self, dense_layers: tuple[int, ...] | list[int] = (0, 1)) -> SparsityConfig:
        """Selection settings for the engine's HND page layout."""
        return SparsityConfig(
            page_size=self.page_size,
            sink_pages=self.sink_pages,
            local_pages=self.local_pages,
            scorer=self.scorer,
            dense_layers=tuple(dense_layers),
            kv_layout="HND",
        )
