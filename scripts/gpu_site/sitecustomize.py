"""Start-up hook of every Python process of the GPU run (scripts/gpu_colocated_run.sh puts this folder first on
PYTHONPATH; Ray's workers inherit it): DeepSpeed builds its Adam as torch's AdamW (`"torch_adam": true`) instead of
JIT-compiling FusedAdam with nvcc on the first `initialize`. sparrow_sgl/openrlhf/patches.py does the same for the
CPU accelerator only. The patch lands when `deepspeed.runtime.engine` is first imported, so other processes pay
nothing. A sitecustomize of the image's own (shadowed by this one) is run afterwards."""

import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "deepspeed.runtime.engine"


def _patch(module) -> None:
    cls = module.DeepSpeedEngine
    original = cls.get_optimizer_configuration

    def get_optimizer_configuration(self, optimizer_parameters, *args, **kwargs):
        optimizer_parameters.setdefault("torch_adam", True)
        return original(self, optimizer_parameters, *args, **kwargs)

    cls.get_optimizer_configuration = get_optimizer_configuration


class _TorchAdamFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("SPARROW_GPU_TORCH_ADAM", "1") != "0":
    sys.meta_path.insert(0, _TorchAdamFinder())

_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _other = os.path.join(_entry or ".", "sitecustomize.py")
    if os.path.abspath(_entry or ".") != _here and os.path.isfile(_other):
        with open(_other) as _f:
            exec(compile(_f.read(), _other, "exec"), {"__name__": "sitecustomize", "__file__": _other})
        break
