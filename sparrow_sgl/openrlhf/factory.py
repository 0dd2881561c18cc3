"""`create_engines`: OpenRLHF's `create_vllm_engines` (vllm_engine.py:209-311), same signature and placement,
creating `SparrowRolloutActor`s. The driver sets the sparrow/sglang configuration once (`configure`)."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sparrow_sgl.openrlhf.engine_group import engine_name
from sparrow_sgl.openrlhf.flags import SGLangFlags, SparrowFlags, to_dict


@dataclass
class DriverConfig:
    sparrow: SparrowFlags
    sglang: SGLangFlags
    out_dir: str
    load_enable: bool = False  # --ckpt.load_enable: engines start on the TailGuard's saved schedule
    batch_samples: tuple[int, int] = (0, 0)  # (fewest, most) samples an engine gets per step; (0, 0): unknown


_config: DriverConfig | None = None


def configure(sparrow: SparrowFlags, sgl: SGLangFlags, out_dir: str, load_enable: bool = False,
              batch_samples: tuple[int, int] = (0, 0)) -> None:
    global _config
    _config = DriverConfig(sparrow, sgl, out_dir, load_enable, batch_samples)


def samples_per_engine(prompts_per_step: int, samples_per_prompt: int, num_engines: int) -> tuple[int, int]:
    """(fewest, most) samples one engine gets per rollout step: OpenRLHF balances a step's prompts over the engines
    (samples_generator.py `_dispatch_prompts_to_vllm`), all samples of a prompt to one engine."""
    engines = max(num_engines, 1)
    return prompts_per_step // engines * samples_per_prompt, -(-prompts_per_step // engines) * samples_per_prompt


def create_engines(num_engines, tensor_parallel_size, pretrain, seed, full_determinism, enable_prefix_caching,
                   enforce_eager, max_model_len, shared_pg=None, gpu_memory_utilization=None,
                   vllm_enable_sleep=False, logprobs_mode=None, agent_func_path=None, remote_rm_url=None,
                   max_images_per_prompt=0):
    if _config is None:
        raise RuntimeError("sparrow_sgl.openrlhf.factory.configure() was not called (use the train_ppo_ray entry)")
    if max_images_per_prompt:
        raise ValueError("sparrow-sgl rollout engines are text-only (--data.max_images_per_prompt 0)")
    from sparrow_sgl.openrlhf.rollout_actor import SparrowRolloutActor

    hybrid = shared_pg is not None
    num_gpus = 0.2 if hybrid else 1
    if not hybrid:
        shared_pg = placement_group([{"GPU": 1, "CPU": 1} for _ in range(num_engines * tensor_parallel_size)],
                                    strategy="PACK")
        ray.get(shared_pg.ready())
    sections = to_dict(_config.sparrow, _config.sglang)
    from sparrow_sgl.openrlhf.guard import resumed_schedule

    schedule = resumed_schedule(_config.sparrow, _config.load_enable)
    engines = []
    for i in range(num_engines):
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=shared_pg,
            placement_group_capture_child_tasks=True,
            placement_group_bundle_index=i * tensor_parallel_size,
        )
        engines.append(
            SparrowRolloutActor.options(num_cpus=num_gpus, num_gpus=num_gpus, scheduling_strategy=strategy,
                                        name=engine_name(i)).remote(
                index=i,
                model=pretrain,
                sparrow=sections["sparrow"],
                sglang=sections["sglang"],
                seed=seed + i,
                max_model_len=max_model_len,
                out_dir=_config.out_dir,
                agent_func_path=agent_func_path,
                remote_rm_url=remote_rm_url,
                enable_sleep=vllm_enable_sleep,
                schedule=schedule,
                gpu_memory_utilization=gpu_memory_utilization,  # the embedded engine's KV pool (like vLLM's)
                batch_samples=_config.batch_samples,
            )
        )
    if vllm_enable_sleep:
        ray.get([e.sleep.remote() for e in engines])
    return engines
