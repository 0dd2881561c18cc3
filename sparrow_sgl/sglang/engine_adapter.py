"""`SGLangEngine`: an SGLang server behind the embedded `Engine`'s interface, for `calibrate` and the GRPO trainer.

    with SGLangEngine.launch("models/qwen3-4b", schedule="qwen3-4b-0.86") as eng:   # starts `sparrow serve`
        rollouts = eng.generate(prompts, SamplingParams(n=8, logprobs_topk=20), schedule="fixed:1024")
    eng = SGLangEngine("http://127.0.0.1:30000", model="models/qwen3-4b")           # a server already running

What differs from the embedded engine (SGLang returns log-probs of sampled tokens and top-k lists, no more):
- `score(..., sparse=None, topk=k)` is dense teacher forcing (one prefill per pair) at temperature 1 with top-k
  lists. Sparse teacher forcing (`sparse=` a non-dense schedule) and full distributions (`return_full=True`) raise
  `ConfigError`: the sparse side of a mismatch measurement is the rollout's own top-k log-probs (top-k mode, a lower
  bound on the acceptance rate).
- `generate(..., schedule=S)` sends S with every request (`custom_params`); a sparse S answered by a server without
  the sparrow backend (`sparrow serve --dense`) raises instead of silently measuring dense attention.
- `update_weights(state_dict)` writes the tensors as safetensors into a private directory and calls
  `/update_weights_from_disk` (the server flushes its prefix cache; the client flushes again and runs a greedy canary,
  kept as `last_canary`). `set_adapter(path)` loads a peft LoRA as the default adapter of every rollout request.
- `SamplingParams.seed` does not make rollouts reproducible: SGLang 0.5.23 uses `sampling_seed` only under
  `--enable-deterministic-inference`, which accepts none of the sparrow / torch_native backends.
- A CPU server started by `launch` runs torch on one thread (`OMP_NUM_THREADS=1` unless set): with other processes
  busy, torch's default threads made decoding ~70x slower (measured on a shared 2-core host).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.rollout import Rollout
from sparrow_sgl.sglang.client import Canary, SGLangError, SGLangRolloutClient

STOCK_BACKEND = "dense (stock backend)"  # the client's schedule name when the server reports no sparrow metadata
SGLANG_PAGE_SIZE = 16  # `sparrow serve` always runs SGLang with page size 16


class SGLangEngine:
    """Embedded-`Engine`-like access to an SGLang server; `close()` stops a server this object started."""

    supports_full_logprobs = False  # top-k lists only: callers measure mismatch in top-k mode

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        tokenizer=None,
        default_schedule: Schedule | None = None,
        dense_url: str | None = None,
        timeout: float = 600.0,
        max_concurrency: int = 64,
        server=None,
    ) -> None:
        """`model`: local HF dir for the tokenizer (default: the server's tokenizer path from `/model_info`).

        `default_schedule`: the server's default schedule, whose page geometry (sink/local pages, scorer, dense
        layers) named schedules ("dense", "fixed:N") take. `dense_url`: a `sparrow serve --dense` baseline server
        that serves dense-schedule rollouts (the noise floor); default: this server with a dense schedule, which
        decodes through the stock backend. `server`: a `ServerProcess` owned (stopped by `close`).
        """
        self.client = SGLangRolloutClient(url, timeout=timeout, max_concurrency=max_concurrency)
        self.dense_client = SGLangRolloutClient(dense_url, timeout, max_concurrency) if dense_url else None
        self.server = server
        self.default_schedule = default_schedule or Schedule.dense(page_size=SGLANG_PAGE_SIZE)
        self._weights_dir: Path | None = None
        self._adapter_path: str | None = None
        self._adapter_count = 0
        try:
            info = self.client.get("/model_info")
        except SGLangError as e:
            self.close()
            raise ConfigError(f"no SGLang server answers at {url}: {e}") from None
        self.model = str(model or info.get("model_path") or "")
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model or info.get("tokenizer_path"))
        self.client.tokenizer = self.tokenizer
        if self.dense_client is not None:
            self.dense_client.tokenizer = self.tokenizer

    # -- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def launch(
        cls,
        model: str,
        schedule: Schedule | str = "dense",
        *,
        device: str = "auto",
        dtype: str = "auto",
        kv_tokens: int | None = None,
        context_length: int | None = None,
        enable_lora: bool = False,
        max_lora_rank: int = 64,
        extra_args: list[str] | None = None,
        port: int | None = None,
        log_dir: str | None = None,
        startup_timeout: float = 600.0,
    ) -> SGLangEngine:
        """Start `sparrow serve` on `model` (the sparrow backend; `schedule` is its default) and connect to it."""
        from sparrow_sgl.sglang.serve import ServerProcess, ServerSpec

        default = _as_schedule(schedule)
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="sparrow-sglang-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        default_path = log_dir / "default_schedule.json"
        default.save(default_path)  # a file keeps sink/local pages, scorer and dense layers, which a name would not
        spec = ServerSpec(
            model=str(model),
            schedule=str(default_path),
            port=port or free_port(),
            device="cuda" if str(device).startswith("cuda") else device,
            dtype=dtype,
            kv_tokens=kv_tokens,
            context_length=context_length,
            enable_lora=enable_lora,
            max_lora_rank=max_lora_rank,
            extra_args=list(extra_args or []),
        )
        log = log_dir / "server.log"
        print(f"sparrow: starting an SGLang server for {model} at {spec.url} (log: {log})", file=sys.stderr)
        with _cpu_threads(spec.device):
            server = ServerProcess(spec, log_path=log)
        atexit.register(server.stop)  # its own process group outlives us unless stopped (stop is idempotent)
        try:
            server.wait_ready(startup_timeout)
            return cls(spec.url, model=str(model), default_schedule=default, server=server)
        except Exception:
            server.stop()
            raise

    def close(self) -> None:
        """Stop the server this engine started (if any) and remove the weight-update directory."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._weights_dir is not None:
            shutil.rmtree(self._weights_dir, ignore_errors=True)
            self._weights_dir = None

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schedules ----------------------------------------------------------------------------------------------------
    def resolve_schedule(self, schedule: Schedule | str | None) -> Schedule:
        """A Schedule for this server. Named 'dense' / 'fixed:N' take the server's page geometry."""
        from sparrow_sgl.schedule import resolve_schedule

        named = schedule is None or (isinstance(schedule, str) and schedule.strip().split(":")[0] in ("dense", "fixed"))
        resolved = resolve_schedule(schedule, page_size=SGLANG_PAGE_SIZE)
        if named:
            d = self.default_schedule
            resolved = dataclasses.replace(
                resolved,
                sink_pages=d.sink_pages,
                local_pages=d.local_pages,
                scorer=d.scorer,
                dense_layers=list(d.dense_layers),
            )
        if resolved.page_size != SGLANG_PAGE_SIZE:
            raise ConfigError(
                f"schedule {resolved.name or ''!r} uses page_size {resolved.page_size}; the SGLang server keeps "
                f"{SGLANG_PAGE_SIZE}-token pages"
            )
        return resolved

    # -- rollouts and scoring -----------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params=None,
        schedule: Schedule | str | None = None,
        progress: bool = True,
    ) -> list[Rollout]:
        """len(prompts) * n rollouts, prompt-major, with `meta` {"schedule", "kv_tokens_mean", "decode_steps"}."""
        from sparrow_sgl.engine.sampling_params import SamplingParams

        params = params or SamplingParams()
        schedule = self.resolve_schedule(schedule)
        client = self.dense_client if schedule.is_dense and self.dense_client is not None else self.client
        rollouts = client.generate(
            prompts, params, schedule=None if client is self.dense_client else schedule, progress=progress
        )
        for r in rollouts:
            if not schedule.is_dense and r.meta["schedule"] == STOCK_BACKEND:
                raise ConfigError(
                    f"the SGLang server at {client.url} decodes densely (no sparrow backend): schedule "
                    f"{schedule.name or 'custom'!r} was not applied; start it with `sparrow serve` without --dense"
                )
            _fill_decode_meta(r)
        return rollouts

    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        sparse: Schedule | str | None = None,
        topk: int = 0,
        return_full: bool = False,
        temperature: float = 1.0,
        progress: bool = False,
    ):
        """Dense teacher-forced log-probs (+ top-k lists) of each response: `ScoreResult`s on CPU."""
        from sparrow_sgl.engine.scoring import ScoreResult

        if sparse is not None and not self.resolve_schedule(sparse).is_dense:
            raise ConfigError(
                "SGLang cannot teacher-force through the sparse decode: measure mismatch in top-k mode, where the "
                "sparse side is the rollout's own top-k log-probs (logprobs_topk > 0)"
            )
        if return_full:
            raise ConfigError("SGLang returns top-k log-probs only, not full distributions: use top-k mode")
        if temperature != 1.0:
            raise ConfigError(f"SGLang scoring gives temperature-1 log-probs only, got temperature {temperature}")
        if len(prompt_ids) != len(response_ids):
            raise ConfigError(f"score got {len(prompt_ids)} prompts but {len(response_ids)} responses")
        results = self.client.score(prompt_ids, response_ids, topk=topk)
        return [ScoreResult(r.logprobs, r.topk_ids, r.topk_logprobs) for r in results]

    # -- weights and adapters -----------------------------------------------------------------------------------------
    @property
    def last_canary(self) -> Canary | None:
        return self.client.last_canary

    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> Canary:
        """Serve new base weights (HF names; a subset is fine): safetensors on disk, reload, flush, canary."""
        from safetensors.torch import save_file

        if self._weights_dir is None:
            self._weights_dir = Path(tempfile.mkdtemp(prefix="sparrow-sglang-weights-"))
        path = self._weights_dir / "model.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(_unshared(weights), str(tmp), metadata={"format": "pt"})
        tmp.replace(path)
        canary = self.client.update_weights_from_disk(str(self._weights_dir))
        if self.dense_client is not None:
            self.dense_client.update_weights_from_disk(str(self._weights_dir))
        return canary

    def set_adapter(self, path: str | Path | None) -> None:
        """Serve base + the peft LoRA at `path` for every rollout (None: base). Needs a server with LoRA enabled."""
        old = self.client.lora
        if path is None:
            if old is not None:
                self.client.unload_lora(old)
            self._adapter_path = None
            return
        self._adapter_count += 1
        name = f"rollout-{self._adapter_count}"  # a fresh name: the server reloads the files even at the same path
        try:
            self.client.load_lora(str(path), name=name, require_change=False)  # a zero-initialised LoRA is a no-op
        except SGLangError as e:
            raise ConfigError(f"SGLang could not load adapter {path} (server started with LoRA enabled?): {e}") from e
        if old is not None:
            self.client.post("/unload_lora_adapter", {"lora_name": old})
        self._adapter_path = str(path)

    @property
    def adapter_path(self) -> str | None:
        return self._adapter_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _cpu_threads(device: str):
    """One torch thread for a CPU server (inherited through the environment) unless OMP_NUM_THREADS is set."""
    if device != "cpu" or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


def _as_schedule(schedule: Schedule | str) -> Schedule:
    from sparrow_sgl.schedule import resolve_schedule

    return resolve_schedule(schedule, page_size=SGLANG_PAGE_SIZE)


def _load_tokenizer(path: str | None):
    if not path or not Path(path).is_dir():
        raise ConfigError(f"no local tokenizer for the SGLang server (got {path!r}): pass model=<local HF dir>")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _fill_decode_meta(r: Rollout) -> None:
    """`decode_steps`, and for dense rollouts the attended KV tokens (the whole context), as the embedded engine."""
    steps = max(len(r.token_ids) - 1, 0)  # the first response token comes from the prefill
    r.meta["decode_steps"] = steps
    if r.meta.get("kv_tokens_mean") is None:
        r.meta["kv_tokens_mean"] = len(r.prompt_ids) + len(r.token_ids) / 2 if steps else 0.0


def _unshared(weights) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; any that share storage with an earlier one (tied embeddings) are copied."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    out, seen = {}, set()
    for name, tensor in items:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out
