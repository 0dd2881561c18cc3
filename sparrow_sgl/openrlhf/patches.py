"""The monkeypatches that put sparrow-sgl under OpenRLHF 0.11.2 without a fork (file:line in its wheel).

`apply_worker()` runs in the driver and, as Ray's `worker_process_setup_hook`, in every Ray worker (a patch made
only in the driver does not reach the actors):
- the `vllm` / `flash_attn` import shims (shims.py);
- trainer-side weight sync: `ActorPPOTrainer._init_vllm_sync_group` / `broadcast_to_vllm` (ppo_actor.py:113,409)
  go over a torch process group SGLang can join (trainer_sync.py) instead of vLLM's PyNccl group; the colocated
  CUDA-IPC path stays OpenRLHF's, followed by the same greedy canary check and sync record;
- tails: rollout top-k through the experience pipeline into the actor's forward, TailGuard between steps (tails.py);
- DistillSparse: the φ step after each policy update, its state in the actor checkpoints (distill_hook.py);
- DeepSpeed on CPU: torch's AdamW instead of a JIT-built fused/CPU Adam (`torch_adam`), no JIT-built shm comm op;
- CPU only (no CUDA): the few `torch.cuda.*` calls OpenRLHF makes unconditionally become no-ops or "cpu".
`apply_driver()` also swaps the engine factory `create_vllm_engines` (train_ppo_ray.py:8 binds it at import).
"""

from __future__ import annotations

import functools
import os

import torch

from sparrow_sgl.openrlhf import shims

_applied: set[str] = set()


def _once(name: str) -> bool:
    if name in _applied:
        return False
    _applied.add(name)
    return True


def apply_worker() -> None:
    """Everything a Ray worker (trainer, engine, PPO controller) needs; idempotent."""
    if not _once("worker"):
        return
    shims.install()
    if not torch.cuda.is_available():
        patch_cuda_for_cpu()
    patch_deepspeed()
    from sparrow_sgl.openrlhf import trainer_sync

    trainer_sync.patch()
    from sparrow_sgl.openrlhf import tails

    tails.patch()
    from sparrow_sgl.openrlhf import distill_hook

    distill_hook.patch()


def apply_driver() -> None:
    apply_worker()
    if not _once("driver"):
        return
    import openrlhf.trainer.ray as ray_pkg
    import openrlhf.trainer.ray.vllm_engine as vllm_engine

    from sparrow_sgl.openrlhf.factory import create_engines

    ray_pkg.create_vllm_engines = create_engines
    vllm_engine.create_vllm_engines = create_engines


# -- CPU ----------------------------------------------------------------------------------------------------------
def patch_cuda_for_cpu() -> None:
    """OpenRLHF calls torch.cuda.set_device/current_device/synchronize/empty_cache/current_stream unconditionally
    (deepspeed.py:97, ppo_actor.py:171,417,627, launcher.py:64,136) and builds `cuda:{current_device()}` for its
    replay buffer (replay_buffer.py:40); `init_device_mesh("cuda", ...)` (deepspeed.py:106) becomes a CPU mesh."""
    torch.cuda.set_device = lambda device: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.current_stream = lambda device=None: None

    import openrlhf.trainer.ppo_utils.replay_buffer as rb
    import openrlhf.utils.deepspeed.deepspeed as ds

    init = rb.NaiveReplayBuffer.__init__

    @functools.wraps(init)
    def buffer_init(self, *args, **kwargs):
        torch.cuda.current_device = lambda: 0  # `cuda:0` only names a device; nothing touches CUDA here
        try:
            init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = lambda: "cpu"
        self.target_device = torch.device("cpu")

    rb.NaiveReplayBuffer.__init__ = buffer_init
    mesh = ds.init_device_mesh
    ds.init_device_mesh = lambda device_type, *a, **kw: mesh("cpu" if device_type == "cuda" else device_type, *a, **kw)


def patch_deepspeed() -> None:
    """CPU accelerator: DeepSpeed would JIT-compile FusedAdam / DeepSpeedCPUAdam and a shared-memory comm op on the
    first `initialize` (minutes; a killed build leaves a lock that hangs the next run). torch's AdamW
    (`"torch_adam": true`, engine.py `get_optimizer_configuration`) and gloo alone do the same job."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import importlib

    import openrlhf.utils.deepspeed.deepspeed as ds

    # not `import deepspeed.comm.torch as m`: that binds the attribute `deepspeed.comm.torch`, i.e. torch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    original = ds.DeepspeedStrategy.get_ds_train_config

    @functools.wraps(original)
    def train_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        optimizer = config.get("optimizer") or {}
        if str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
            optimizer.setdefault("params", {})["torch_adam"] = True
        return config

    ds.DeepspeedStrategy.get_ds_train_config = train_config


def clean_stale_extension_locks(max_age_s: float = 600.0) -> list[str]:
    """Remove torch_extensions build `lock` files older than `max_age_s` (left by a killed JIT build; the next
    build would wait on them forever in FileBaton.wait)."""
    import time
    from pathlib import Path

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    removed = []
    if root.is_dir():
        for lock in root.rglob("lock"):
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink(missing_ok=True)
                removed.append(str(lock))
    return removed
