"""An SGLang server with the `sparrow` backend behind an OpenRLHF rollout actor (HTTP, through sparrow_sgl.sglang).

SGLang `Engine`'s sync methods run their own event loop and fail inside OpenRLHF's async actors, so each actor
drives a server over HTTP: one it starts (`--sglang.*` settings; it dies with the actor) or one of `--sglang.url`.
OpenRLHF's engine calls map onto SGLang's endpoints: the weights-update group (`/init_weights_update_group`; each
sync is `/begin_weight_update` + `/update_weights_from_distributed` + `/end_weight_update`), the same group
weight_sync.py builds on the trainer side; `/flush_cache`; `/release_memory_occupation` and
`/resume_memory_occupation` (GPU only: SGLang's memory saver needs CUDA).
"""

from __future__ import annotations

import ctypes
import shlex
import signal
import subprocess
from pathlib import Path

from sparrow_sgl.config import Schedule
from sparrow_sgl.openrlhf.embedded_backend import Canary, engine_params
from sparrow_sgl.openrlhf.flags import SGLangFlags, SparrowFlags
from sparrow_sgl.rollout import Rollout
from sparrow_sgl.schedule import resolve_schedule
from sparrow_sgl.sglang.client import CANARY_PROMPT, SGLangRolloutClient
from sparrow_sgl.sglang.serve import ServerProcess, ServerSpec

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the server process before exec: SIGTERM when the actor that started it dies (Ray kills actors)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ActorServer(ServerProcess):
    """`sparrow serve`'s server process, bound to the lifetime of the rollout actor that started it."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec, self.log_path = spec, log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(spec.argv(), env=spec.env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SGLangBackend:
    name = "sglang"

    def __init__(self, model: str, sparrow: SparrowFlags, sgl: SGLangFlags, index: int, seed: int,
                 max_model_len: int | None, out_dir: str) -> None:
        self.server = None
        url = sgl.url.split(",")[index].strip() if sgl.url else None
        if url is None:
            spec = ServerSpec(
                model=model, port=free_port(), device=sgl.device, dtype=sgl.dtype, kv_tokens=sgl.kv_tokens,
                context_length=max_model_len, enable_lora=sparrow.distill.enabled,
                max_lora_rank=max(sparrow.distill.rank, 8), cuda_graph=sgl.cuda_graph,
                group_timeout_s=sparrow.sync_timeout,  # the server's weights-group rendezvous and broadcasts
                extra_args=[*shlex.split(sgl.extra_args), "--random-seed", str(seed)],
            )
            log_dir = Path(sgl.log_dir or Path(out_dir) / "sglang")
            log_dir.mkdir(parents=True, exist_ok=True)
            self.server = ActorServer(spec, log_dir / f"engine_{index}.log")
            try:
                self.server.wait_ready(sgl.startup_timeout)
            except Exception:
                self.server.stop()
                raise
            url = spec.url
        self.device_kind = "cuda" if self.server is None or self.server.spec.device == "cuda" else "cpu"
        self.client = SGLangRolloutClient(url, timeout=sgl.request_timeout)

    def resolve_schedule(self, spec: str | dict | Schedule) -> Schedule:
        return Schedule.from_dict(spec) if isinstance(spec, dict) else resolve_schedule(spec, page_size=16)

    def generate(self, prompts: list[list[int]], params, schedule: Schedule, topk: int) -> list[Rollout]:
        rollouts = self.client.generate(prompts, engine_params(params, topk), schedule=schedule)
        for r in rollouts:  # the server reports attended KV tokens; its decode steps are the response length - 1
            r.meta.setdefault("decode_steps", max(len(r.token_ids) - 1, 0))
        return rollouts

    # -- weights ----------------------------------------------------------------------------------------------
    def init_weights_group(self, master_address, master_port, rank_offset, world_size, group_name, backend,
                           timeout_s) -> None:
        """Join the trainer's weights group; the server bounds it by `timeout_s` = --sparrow.sync_timeout, given at
        launch (SPARROW_WEIGHTS_GROUP_TIMEOUT_S: SGLang's request has no timeout field)."""
        self.client.post("/init_weights_update_group", {
            "master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend,
        })
        return None

    def update_weights_from_group(self, specs, group_name: str) -> None:
        """One SGLang weight-update session (0.5.23: begin / update_weights_from_distributed / end)."""
        self.client.post("/begin_weight_update", {})
        try:
            self.client.post("/update_weights_from_distributed", {
                "names": [s.name for s in specs], "dtypes": [s.dtype for s in specs],
                "shapes": [list(s.shape) for s in specs], "group_name": group_name, "flush_cache": True,
            })
        finally:
            self.client.post("/end_weight_update", {})

    def apply_weights(self, named) -> None:
        raise NotImplementedError("an SGLang engine takes weights through its update group (update_weights)")

    def canary(self, num_tokens: int) -> Canary:
        c = self.client.canary(num_tokens)
        return Canary(list(CANARY_PROMPT), list(c.token_ids), list(c.logprobs))

    def set_adapter(self, path: str | None) -> None:
        if path is None:
            self.client.unload_lora()
        else:
            self.client.load_lora(path, require_change=False)

    # -- cache and memory -------------------------------------------------------------------------------------
    def flush_cache(self) -> None:
        self.client.flush_cache()

    def release_memory(self, tags: list[str]) -> None:
        if self.device_kind == "cuda":
            self.client.post("/release_memory_occupation", {"tags": list(tags)})

    def resume_memory(self, tags: list[str]) -> None:
        if self.device_kind == "cuda":
            self.client.post("/resume_memory_occupation", {"tags": list(tags)})

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
