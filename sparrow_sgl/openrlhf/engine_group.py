"""`EngineGroup`: OpenRLHF's rollout engines, from a trainer process, as the `engine` DistillSparse expects.

`distill.trainer.DistillTrainer` pushes φ with `engine.set_adapter(path)` and resolves schedules with
`engine.resolve_schedule`; its re-planner measures tails with `generate` / `score` and toggles the adapter to score
the dense policy θ without φ (`distill.replan.TrainedDenseView`). Here `set_adapter` reaches every engine (a peft
dir: `--sparrow.out_dir` must be readable by every engine, as SGLang's own `load_lora_adapter` also needs);
`generate` / `score` run on engine 0 (`SparrowRolloutActor.engine_call`, embedded engine only). Every call waits at
most `--sparrow.sync_timeout` seconds (weight_sync.wait).
"""

from __future__ import annotations

from sparrow_sgl.config import Schedule
from sparrow_sgl.schedule import resolve_schedule, with_bin_width


def engine_name(index: int) -> str:
    """The Ray actor name of rollout engine `index` (factory.create_engines names them)."""
    return f"sparrow-engine-{index}"


def engine_handles(num_engines: int) -> list:
    """The engine actors of this job, from any of its actors (the experience maker has no handles of its own)."""
    import ray

    return [ray.get_actor(engine_name(i)) for i in range(num_engines)]


def call_all(num_engines: int, method: str, *args, timeout_s: float) -> list:
    """`method(*args)` on every engine (found by name), each answer awaited at most `timeout_s` (SyncError)."""
    from sparrow_sgl.openrlhf.weight_sync import wait

    refs = [getattr(h, method).remote(*args) for h in engine_handles(num_engines)]
    return wait(refs, timeout_s, f"engine {method}")


class EngineGroup:
    def __init__(self, num_engines: int, timeout_s: float, bin_tokens: int, active: bool = True) -> None:
        self.num_engines, self.timeout_s, self.bin_tokens = num_engines, timeout_s, bin_tokens
        self.active = active  # False on DeepSpeed ranks > 0: rank 0 alone talks to the engines
        self.tokenizer = None
        self._adapter: str | None = None

    def _handles(self) -> list:
        return engine_handles(self.num_engines)

    def _all(self, method: str, *args) -> list:
        return call_all(self.num_engines, method, *args, timeout_s=self.timeout_s)

    def resolve_schedule(self, spec: str | dict | Schedule) -> Schedule:
        """A schedule as the engines resolve it (page size 16; a one-budget schedule takes the run's bin width)."""
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, dict):
            return Schedule.from_dict(spec)
        return with_bin_width(resolve_schedule(spec, page_size=16), self.bin_tokens)

    def set_adapter(self, path: str | None) -> None:
        if self.active:
            self._all("set_adapter", path)
        self._adapter = path

    @property
    def adapter_path(self) -> str | None:
        return self._adapter

    def set_schedule(self, schedule: Schedule) -> None:
        if self.active:
            self._all("set_schedule", schedule.to_dict())

    def current_schedule(self) -> Schedule:
        """The schedule engine 0 rolls out with now (its own sink/local/scorer resolution of the flag)."""
        from sparrow_sgl.openrlhf.weight_sync import wait

        return Schedule.from_dict(wait([self._handles()[0].get_schedule.remote()], self.timeout_s, "get_schedule")[0])

    # -- measurement (re-planner), on engine 0 ------------------------------------------------------------------
    def _call(self, method: str, *args, **kwargs):
        from sparrow_sgl.openrlhf.weight_sync import wait

        return wait([self._handles()[0].engine_call.remote(method, args, kwargs)], self.timeout_s, method)[0]

    def generate(self, *args, **kwargs):
        return self._call("generate", *args, **kwargs)

    def score(self, *args, **kwargs):
        return self._call("score", *args, **kwargs)
