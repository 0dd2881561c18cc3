"""GPU: the sparrow backend's decode captured with `torch.cuda.graph` and replayed as SGLang's DecodeCudaGraphRunner
does, with FlashInfer as the inner (dense layers, prefill) backend, equals eager decode.

Real SGLang `ReqToTokenPool` / `MHATokenToKVPool` / `ForwardBatch` / `build_replay_fb_view`, server config published
the way SGLang's own attention test kit does it; bf16, head_dim 128, GQA 4:1, four layers (0-1 dense through
FlashInfer's graph wrappers, 2-3 sparse through the Triton selection + decode recorded in the graph), mixed
per-request schedules (dense, fixed:48, fixed:64, dense-then-sparse), batches of 4, 3, 2 and 1 live rows in graphs
of 4, 4, 2 and 1 (padded rows hold junk), one eager step between replays. Compares every live output, the page
summaries and the `meta_info["sparrow"]` accounting.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import types

import pytest
import torch

# Device machines without SGLang's CUDA-built packages (sgl_kernel & co: GBs, torch-version bound) carry SGLang's
# Python files instead and answer those imports with stubs. Opt-in, and only for modules that need their own CUDA
# build; SGLang's code and ours are never stubbed. Run this file alone then (stubs must precede the sglang import).
STUB_ENV = "SPARROW_SGLANG_KERNEL_STUBS"
STUBBED = ("sgl_kernel", "vllm", "deep_gemm", "sgl_deep_ep", "deep_ep", "flash_mla", "sgl_flash_mla")


class _StubMeta(type):
    def __getattr__(cls, name):  # e.g. scalar_types.uint4b8
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__module__}.{name}")


def _placeholder(qualname: str) -> type:
    def fail(*args, **kwargs):
        raise RuntimeError(f"{qualname} is a device-test stub (its CUDA build was not carried)")

    return _StubMeta(qualname.rsplit(".", 1)[-1], (), {"__init__": fail, "__call__": fail, "__module__": qualname})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] not in STUBBED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


if os.environ.get(STUB_ENV) == "1" and not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _StubFinder())

pytest.importorskip("sglang")

from test_sglang_graph import SCHEDULES, publish_server_args, run_both  # noqa: E402

from sparrow_sgl.sglang import request_state  # noqa: E402
from sparrow_sgl.sglang.request_state import REGISTRY  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.sglang]

BF16_ATOL = 2e-2  # outputs ~0.1-0.5; a wrong page set moves them by ~0.1


@pytest.fixture
def server_args():
    override, args = publish_server_args()
    yield args
    override.restore()
    REGISTRY.active = False
    REGISTRY.slot_reader = None
    request_state.server_schedule.cache_clear()


@pytest.mark.parametrize(("max_context", "prompt_scale"), [(512, 1), (4096, 20)])  # 33-70 / 660-1400 tokens
def test_cuda_graph_replay_equals_eager_with_flashinfer_inner(server_args, max_context, prompt_scale):
    worst, eager_reports, graph_reports, (eager, graph) = run_both(
        device="cuda", dtype=torch.bfloat16, steps=40, use_cuda_graph=True, atol=BF16_ATOL, prompt_scale=prompt_scale,
        layers=4, q_heads=8, kv_heads=2, dim=128, pages=len(SCHEDULES) * max_context // 16 + 8,
        max_context=max_context, server_args=server_args,
    )
    assert type(graph.backend.inner).__name__ == "FlashInferAttnBackend"
    assert graph.backend.graph.slot_table.is_cuda
    for rid in SCHEDULES:
        e, g = eager_reports[rid], graph_reports[rid]
        assert e["schedule"] == g["schedule"] and e["sparse_layer_steps"] == g["sparse_layer_steps"] > 0
        assert g["kv_tokens_mean"] == pytest.approx(e["kv_tokens_mean"], rel=1e-6)
    summary_diff = 0.0
    for layer_id, mine in graph.backend.summaries.items():
        theirs = eager.backend.summaries[layer_id]
        summary_diff = max(summary_diff, (mine.key_sum[1:] - theirs.key_sum[1:]).abs().max().item())
        assert torch.equal(mine.count[1:], theirs.count[1:])
    assert summary_diff <= 1e-3
    print("SGLGRAPH_RESULT " + json.dumps({
        "device": torch.cuda.get_device_name(), "max_context": max_context, "prompt_scale": prompt_scale,
        "max_abs_output_diff": worst,
        "max_abs_summary_diff": summary_diff, "graph_reports": graph_reports, "eager_reports": eager_reports,
    }))
