"""`sparrow serve`: launch SGLang's HTTP server with the `sparrow` block-sparse backend (or, `--dense`, the stock one).

    sparrow serve --model DIR --schedule qwen3-4b-0.86 [--port 30000] [--host 127.0.0.1]
    sparrow serve --model DIR --dense          # the dense SGLang baseline with the same settings

The schedule is the server default (`SPARROW_SCHEDULE`, inherited by SGLang's spawned scheduler); a request may
override it with `sampling_params.custom_params["sparrow_schedule"]`. The server always runs with page size 16 (the
schedule's page size) so that both runs share the KV layout and prefix-cache granularity. Equivalent raw launch:
`python -m sglang.launch_server --model-path DIR --attention-backend sparrow --page-size 16 --sparrow-schedule S`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sparrow_sgl.config import ConfigError

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--schedule", default="dense", help="default schedule: preset name, fixed:N, dense or JSON path")
    p.add_argument("--dense", action="store_true", help="stock dense attention backend (baseline), no sparsity")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--kv-tokens", type=int, default=None, help="KV pool size in tokens (default: SGLang's; CPU 16384)")
    p.add_argument("--context-length", type=int, default=None, help="max prompt + response tokens")
    p.add_argument("--no-cuda-graph", action="store_true", help="GPU: decode eagerly (SGLang --disable-cuda-graph)")
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (DistillSparse rollout adapter)")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server")
    p.add_argument("--sglang-args", default="", help='extra SGLang flags, one string: "--chunked-prefill-size 4096"')


@dataclass
class ServerSpec:
    model: str
    schedule: str = "dense"
    dense: bool = False
    host: str = "127.0.0.1"
    port: int = 30000
    device: str = "auto"
    dtype: str = "auto"
    kv_tokens: int | None = None
    context_length: int | None = None
    enable_lora: bool = False
    max_lora_rank: int = 64
    cuda_graph: bool = True  # GPU decode through CUDA graphs (the sparrow backend captures its sparse decode too)
    extra_args: list[str] = field(default_factory=list)
    group_timeout_s: float | None = None  # the weights-update group's timeout (None: the server's default, 600 s)

    def __post_init__(self) -> None:
        check_model_dir(self.model)
        if not self.dense:
            from sparrow_sgl.sglang.request_state import parse_schedule

            parse_schedule(self.schedule, allow_files=True)  # refuse a bad schedule here, with its message
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto" and self.device == "cpu":
            self.dtype = "float32"  # SGLang's "auto" turns float32 checkpoints into float16

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def backend(self) -> str:
        if not self.dense:
            return "sparrow"
        return "torch_native" if self.device == "cpu" else "flashinfer"

    def argv(self) -> list[str]:
        """The `python -m sglang.launch_server` command line."""
        args = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(self.model)]
        args += ["--host", self.host, "--port", str(self.port), "--device", self.device, "--dtype", self.dtype]
        args += ["--attention-backend", self.backend(), "--page-size", "16"]
        if self.device == "cpu":  # the generic device path (see cpu_support.py), a small static pool
            # --max-total-tokens sizes the pool; the fraction is only SGLang's start-up check that free host memory
            # did not drop by more than it while the weights loaded, which other processes on a shared host can
            # make fail at 0.1 ("Loaded weights leave no GPU memory for the KV cache")
            args += ["--mem-fraction-static", "0.3", "--max-total-tokens", str(self.kv_tokens or 16384)]
        else:
            if self.kv_tokens:
                args += ["--max-total-tokens", str(self.kv_tokens)]
            # decode graphs only: the sparrow backend binds schedules and summaries in eager extends (the dense
            # baseline keeps the same settings)
            args += ["--disable-cuda-graph"] if not self.cuda_graph else ["--disable-prefill-cuda-graph"]
        context = self.context_length or self._pool_bounded_context()
        if context:
            args += ["--context-length", str(context)]
        if self.enable_lora:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras-per-batch", "2"]
            args += ["--lora-target-modules", "all"]
            if self.device == "cpu":
                args += ["--lora-backend", "torch_native"]
        return args + list(self.extra_args)

    def _pool_bounded_context(self) -> int | None:
        """On CPU, cap the context at the KV pool so that an over-long prompt gets a 400, not a truncation."""
        if self.device != "cpu":
            return None
        pool = self.kv_tokens or 16384
        model_max = json.loads((Path(self.model) / "config.json").read_text()).get("max_position_embeddings")
        return pool if model_max is None or pool < int(model_max) else None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("SGLANG_USE_CPU_ENGINE", None)  # needs a CUDA build of sgl_kernel
        if self.dense:
            env.pop("SPARROW_SCHEDULE", None)
        else:
            env["SPARROW_SCHEDULE"] = self.schedule
        if self.group_timeout_s is not None:
            from sparrow_sgl.sglang.group_routes import ENV_TIMEOUT

            env[ENV_TIMEOUT] = f"{self.group_timeout_s:g}"
        return env


def check_model_dir(model: str | os.PathLike) -> None:
    """Refuse a missing model dir or an architecture the sparrow backend was not built for, before launching."""
    config = Path(model) / "config.json"
    if not config.is_file():
        raise ConfigError(f"model directory {model} has no config.json")
    archs = json.loads(config.read_text()).get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError(f"unsupported model architecture {archs} in {config}; supported: {SUPPORTED_ARCHITECTURES}")


class ServerProcess:
    """A running SGLang server (started by `start`); `stop()` ends it and its children."""

    def __init__(self, spec: ServerSpec, log_path: str | os.PathLike | None = None) -> None:
        """`log_path`: file for the server's output; None lets it share this process's stdout/stderr."""
        self.spec = spec
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            spec.argv(),
            env=spec.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return self.spec.url

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang server exited with code {self.proc.returncode}; {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=30) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"SGLang server at {self.url} not ready after {timeout:.0f} s; {self._log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the scheduler and detokenizer go too
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        if self._log is not None:
            self._log.close()

    def _log_tail(self, chars: int = 3000) -> str:
        if not self.log_path:
            return "see the server output above"
        return "log tail:\n" + Path(self.log_path).read_text(errors="replace")[-chars:]


def start(spec: ServerSpec, log_path=None, timeout: float = 600.0) -> ServerProcess:
    server = ServerProcess(spec, log_path)
    server.wait_ready(timeout)
    return server


def run(args: argparse.Namespace) -> int:
    extra = shlex.split(args.sglang_args)
    spec = ServerSpec(
        model=args.model,
        schedule=args.schedule,
        dense=args.dense,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        kv_tokens=args.kv_tokens,
        context_length=args.context_length,
        enable_lora=args.enable_lora,
        max_lora_rank=args.max_lora_rank,
        cuda_graph=not args.no_cuda_graph,
        extra_args=extra,
    )
    what = "dense baseline (stock backend)" if spec.dense else f"schedule {spec.schedule}"
    print(f"sparrow serve: starting SGLang ({spec.backend()} attention, {what}, device {spec.device})", flush=True)
    server = ServerProcess(spec, log_path=None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwind through `finally`: the server goes down too
    try:
        server.wait_ready(args.startup_timeout)
        print(f"sparrow serve: ready at {spec.url}", flush=True)
        return server.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
