"""`python -m sparrow_sgl.openrlhf.train_ppo_ray [OpenRLHF flags] [--sparrow.* ...] [--sglang.* ...]`

Applies the patches (patches.py), then runs OpenRLHF's own CLI module `openrlhf.cli.train_ppo_ray` with runpy, so
every OpenRLHF flag, default and validation works unchanged. Three wrappers are in place while it runs:
- `ArgumentParser.parse_args` (one shot): adds our flags and checks them with OpenRLHF's; a bad one exits with
  code 2 before Ray is touched;
- `hierarchize`: keeps the resolved args (OpenRLHF validates them in place afterwards) and fills defaults;
- `ray.init`: adds the `worker_process_setup_hook` that applies the patches in every Ray worker (plus, on a
  machine without CUDA and without a cluster to join, logical GPUs so OpenRLHF's GPU actors can be placed); with
  `--sparrow.dry_run` it prints the resolved configuration instead and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

from sparrow_sgl.config import ConfigError

OPENRLHF_CLI = "openrlhf.cli.train_ppo_ray"
WORKER_HOOK = "sparrow_sgl.openrlhf.patches.apply_worker"
CPU_LOGICAL_GPUS = 8


@dataclass
class _Run:
    sparrow: object = None
    sglang: object = None
    args: object = None  # OpenRLHF's hierarchical namespace


@contextlib.contextmanager
def _patched(owner, name: str, replacement):
    original = getattr(owner, name)
    setattr(owner, name, replacement(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _parse_args(run: _Run):
    from sparrow_sgl.openrlhf import factory, flags

    def wrap(original):
        def parse_args(self, args=None, namespace=None):
            argparse.ArgumentParser.parse_args = original  # one shot: only OpenRLHF's parser
            flags.add_flags(self)
            ns = original(self, args, namespace)
            try:
                run.sparrow, run.sglang = flags.check(ns)
            except ConfigError as e:
                self.error(str(e))
            if not getattr(ns, "sparrow.out_dir"):
                setattr(ns, "sparrow.out_dir", str(Path(getattr(ns, "ckpt.output_dir")).absolute() / "sparrow"))
                run.sparrow.out_dir = getattr(ns, "sparrow.out_dir")
            per_engine = factory.samples_per_engine(getattr(ns, "rollout.batch_size"),
                                                    getattr(ns, "rollout.n_samples_per_prompt"),
                                                    getattr(ns, "vllm.num_engines"))
            factory.configure(run.sparrow, run.sglang, run.sparrow.out_dir, bool(getattr(ns, "ckpt.load_enable")),
                              per_engine)
            return ns

        return parse_args

    return wrap


def _hierarchize(run: _Run):
    def wrap(original):
        def hierarchize(args):
            run.args = original(args)
            return run.args

        return hierarchize

    return wrap


def _ray_init(run: _Run):
    def wrap(original):
        def init(*args, **kwargs):
            if run.sparrow is not None and run.sparrow.dry_run:
                print(json.dumps(resolved(run), indent=2, default=str))
                raise SystemExit(0)
            return original(*args, **_with_hook(kwargs))

        return init

    return wrap


def _with_hook(kwargs: dict) -> dict:
    import torch

    runtime_env = dict(kwargs.get("runtime_env") or {})
    runtime_env["worker_process_setup_hook"] = WORKER_HOOK
    env_vars = dict(runtime_env.get("env_vars") or {})
    root = str(Path(__file__).resolve().parents[2])
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env["env_vars"] = env_vars
    kwargs = {**kwargs, "runtime_env": runtime_env}
    joining = kwargs.get("address") or os.environ.get("RAY_ADDRESS")
    if not torch.cuda.is_available() and not joining:
        kwargs.setdefault("num_gpus", CPU_LOGICAL_GPUS)
        kwargs.setdefault("num_cpus", CPU_LOGICAL_GPUS * 2)
    return kwargs


def resolved(run: _Run) -> dict:
    """The configuration as OpenRLHF validated it, sections nested as on `strategy.args`."""

    def plain(x):
        return {k: plain(v) for k, v in vars(x).items()} if hasattr(x, "__dict__") else x

    return plain(run.args)


def main(argv: list[str] | None = None) -> None:
    from sparrow_sgl.openrlhf import patches

    argv = sys.argv[1:] if argv is None else list(argv)
    patches.apply_driver()
    patches.clean_stale_extension_locks()
    import openrlhf.utils.config as openrlhf_config
    import ray

    run = _Run()
    sys.argv = [OPENRLHF_CLI, *argv]
    with (
        _patched(argparse.ArgumentParser, "parse_args", _parse_args(run)),
        _patched(openrlhf_config, "hierarchize", _hierarchize(run)),
        _patched(ray, "init", _ray_init(run)),
    ):
        runpy.run_module(OPENRLHF_CLI, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
