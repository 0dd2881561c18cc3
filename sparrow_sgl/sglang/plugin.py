"""SGLang plugin entry point (group `sglang.srt.plugins`), run by SGLang in every process before argument parsing.

Registers the `sparrow` attention backend (name accepted by `--attention-backend` and `sglang.Engine`), installs
the request/response hooks (`hooks.py`), and on a CPU-only host the CPU support patches (`cpu_support.py`).
"""

from __future__ import annotations

BACKEND_NAME = "sparrow"


def register() -> None:
    from sparrow_sgl.sglang import cpu_support, hooks

    cpu_support.apply()  # no-op when CUDA is available
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    register_attention_backend(BACKEND_NAME)(_create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    hooks.install()


def _create_backend(model_runner):
    from sparrow_sgl.sglang.backend import SparrowAttnBackend

    return SparrowAttnBackend(model_runner)
