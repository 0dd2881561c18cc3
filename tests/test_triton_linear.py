"""Small-M Triton linear (attention/kernels/triton_linear.py) and the engine's Linear (engine/linear.py).

CPU: Linear is nn.Linear bit for bit; the auto choice is cached (timing faked). With SPARROW_TRITON_INTERPRET=1
(CPU, triton installed) the kernel runs through Triton's interpreter; there and with `-m gpu` it equals a float32
reference within bf16 rounding for ragged shapes, split-K, bias and the fused SiLU x up, leaves its tile counters
at 0 and repeats bit for bit. `-m gpu`: auto times once and caches, a captured graph replays correctly (PDL too on
sm_90+), and the engine's greedy decode with SPARROW_LINEAR=triton matches cuBLAS.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import make_engine, random_prompts
from triton_helpers import DEVICES, needs_triton

from sparrow_sgl.engine import SamplingParams, fused, linear_table
from sparrow_sgl.engine import linear as linear_mod
from sparrow_sgl.engine.linear import Linear
from sparrow_sgl.errors import ConfigError


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch, tmp_path):
    monkeypatch.setattr(linear_mod, "_CHOICES", {})
    monkeypatch.setenv(linear_table.CACHE_ENV, str(tmp_path / "gemm-cache" / "choices.json"))
    monkeypatch.delenv(linear_mod.LINEAR_ENV, raising=False)
    monkeypatch.delenv(linear_mod.PDL_ENV, raising=False)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, silu: bool) -> torch.Tensor:
    a = fused.silu_mul(x) if silu else x
    return F.linear(a.float(), w.float(), None if b is None else b.float())


def _check(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within bf16 rounding of the float32 result (the interpreter truncates instead of rounding: ~1 ulp)."""
    assert got.shape == ref.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- CPU: Linear is nn.Linear

@pytest.mark.parametrize("mode", ["auto", "cublas", "triton"])
def test_cpu_linear_is_nn_linear_bit_for_bit(monkeypatch, mode):
    monkeypatch.setenv(linear_mod.LINEAR_ENV, mode)
    torch.manual_seed(0)
    ours, ref = Linear(24, 40, bias=True).to(torch.bfloat16), torch.nn.Linear(24, 40, bias=True).to(torch.bfloat16)
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x, gate_up = torch.randn(7, 24).bfloat16(), torch.randn(7, 48).bfloat16()
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        assert torch.equal(ours.forward_silu_mul(gate_up), ref(F.silu(gate_up[:, :24]) * gate_up[:, 24:]))
    assert not linear_mod.chosen()


def test_auto_choice_is_cached_and_never_timed_inside_capture(monkeypatch):
    """Timing is faked (cuBLAS wins): one timing per key, none while a graph is being captured."""
    calls = []
    monkeypatch.setattr(linear_mod, "time_choices", lambda *a, **k: calls.append(a[0].shape) or {None: 1.0})
    monkeypatch.setattr(Linear, "_triton_applies", lambda self, x, silu: True)
    layer = Linear(16, 8, bias=False)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight))
        layer(torch.randn(7, 16))  # the same M bucket (8): cached
        assert len(calls) == 1 and len(linear_mod.chosen()) == 1
        monkeypatch.setattr(linear_mod, "_capturing", lambda x: True)
        assert torch.equal(layer(x[:2]), F.linear(x[:2], layer.weight))  # bucket 2, capturing: cuBLAS, untimed
    assert len(calls) == 1 and len(linear_mod.chosen()) == 1


def test_shipped_table_round_trip_and_env(tmp_path, monkeypatch):
    """Tune rows -> table -> lookup; SPARROW_LINEAR_TABLE=0 ignores the table, =PATH reads another one."""
    rows = [{"kind": "tune", "gpu": "Fake GPU", "m": 25, "gemm": "o", "pdl": False, "n": 64, "k": 128,
             "cublas_us": 10.0, "triton_us": 9.0, "config_n_k_split_warps_stages": [64, 128, 2, 4, 3]},
            {"kind": "tune", "gpu": "Fake GPU", "m": 32, "gemm": "down+silu", "pdl": False, "n": 64, "k": 128,
             "cublas_us": 10.0, "triton_us": 11.0, "config_n_k_split_warps_stages": [64, 64, 1, 4, 4]},
            {"kind": "stack", "gpu": "Fake GPU", "m": 32}]
    table = linear_table.table_from_tune_rows(rows)
    key = linear_table.table_key(32, 64, 128, torch.bfloat16, False, False, False)
    assert key == "32,64,128,bfloat16,0,0,0"
    assert linear_table.lookup(table, "Fake GPU", key) == (True, (64, 128, 2, 4, 3))
    silu_key = linear_table.table_key(32, 64, 128, torch.bfloat16, False, True, False)
    assert linear_table.lookup(table, "Fake GPU", silu_key) == (True, None)  # cuBLAS was faster
    assert linear_table.lookup(table, "Other GPU", key) == (False, None)
    shipped = linear_table.load_table()
    assert len(shipped["NVIDIA H200"]) == 72  # Qwen3 1.7B/4B/8B x M 32/64 x 6 GEMMs x PDL off/on
    assert all(c == "cublas" or (len(c) == 5 and min(c) > 0) for c in shipped["NVIDIA H200"].values())
    monkeypatch.setenv(linear_table.TABLE_ENV, "0")
    assert linear_table.load_table() == {}
    path = tmp_path / "choices.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(linear_table.TABLE_ENV, str(path))
    assert linear_table.load_table() == table
    for bad in (tmp_path / "missing.json", tmp_path / "list.json"):
        (tmp_path / "list.json").write_text("[1, 2]")
        monkeypatch.setenv(linear_table.TABLE_ENV, str(bad))
        with pytest.raises(ConfigError, match=linear_table.TABLE_ENV):
            linear_table.load_table()
    monkeypatch.setenv(linear_table.TABLE_ENV, str(path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert linear_mod.shipped_choice((torch.device("cuda", 0), 32, 64, 128, torch.bfloat16, False, True,
                                      False)) == (True, None)
    assert linear_mod.shipped_choice((torch.device("cpu"), 32, 64, 128, torch.bfloat16, False, True,
                                      False)) == (False, None)


def test_a_shipped_choice_is_taken_without_timing(monkeypatch):
    monkeypatch.setattr(linear_mod, "time_choices", lambda *a, **k: pytest.fail("timed a shipped shape"))
    monkeypatch.setattr(linear_mod, "shipped_choice", lambda key: (True, None))  # cuBLAS, as measured
    monkeypatch.setattr(Linear, "_triton_applies", lambda self, x, silu: True)
    layer = Linear(16, 8, bias=False)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    assert list(linear_mod.chosen().values()) == [None]


FAKE_KEY = (torch.device("cuda", 0), 32, 64, 128, torch.bfloat16, False, False, False)


def _fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")


def test_a_timed_choice_is_remembered_a_failed_timing_is_not(monkeypatch):
    remembered = []
    monkeypatch.setattr(linear_mod, "time_choices", lambda *a, **k: {None: 1.0})
    monkeypatch.setattr(linear_mod, "remember_choice", lambda key, choice: remembered.append((key, choice)))
    monkeypatch.setattr(Linear, "_triton_applies", lambda self, x, silu: True)
    with torch.no_grad():
        Linear(16, 8, bias=False)(torch.randn(5, 16))
        assert remembered == [((torch.device("cpu"), 8, 8, 16, torch.float32, False, False, False), None)]
        monkeypatch.setattr(linear_mod, "time_choices", lambda *a, **k: 1 / 0)
        Linear(16, 4, bias=False)(torch.randn(5, 16))  # reported, cuBLAS for this process only
    assert len(remembered) == 1 and len(linear_mod.chosen()) == 2


def test_a_remembered_choice_is_found_by_the_next_engine(monkeypatch):
    """A cached cuBLAS choice is found again; SPARROW_LINEAR_CACHE=0 turns the cache off."""
    _fake_gpu(monkeypatch)
    monkeypatch.setenv(linear_table.TABLE_ENV, "0")
    assert linear_mod.shipped_choice(FAKE_KEY) == (False, None)
    linear_mod.remember_choice(FAKE_KEY, None)
    table_key = linear_table.table_key(*FAKE_KEY[1:])
    assert json.loads(linear_table.cache_path().read_text()) == {"Fake GPU": {table_key: "cublas"}}
    assert linear_mod.shipped_choice(FAKE_KEY) == (True, None)
    monkeypatch.setenv(linear_table.CACHE_ENV, "0")
    assert linear_table.cache_path() is None and linear_mod.shipped_choice(FAKE_KEY) == (False, None)


@needs_triton
def test_a_remembered_triton_config_comes_back_as_a_config(monkeypatch, tmp_path):
    from sparrow_sgl.attention.kernels.triton_linear import Config

    _fake_gpu(monkeypatch)
    monkeypatch.setenv(linear_table.TABLE_ENV, "0")
    linear_mod.remember_choice(FAKE_KEY, Config(64, 128, 2, 4, 3))
    assert linear_mod.shipped_choice(FAKE_KEY) == (True, Config(64, 128, 2, 4, 3))
    table = tmp_path / "table.json"  # a table entry for the shape wins over the cache
    table.write_text(json.dumps({"Fake GPU": {linear_table.table_key(*FAKE_KEY[1:]): "cublas"}}))
    monkeypatch.setenv(linear_table.TABLE_ENV, str(table))
    assert linear_mod.shipped_choice(FAKE_KEY) == (True, None)


def test_the_default_cache_lives_in_the_user_cache_and_names_the_versions(monkeypatch, tmp_path):
    monkeypatch.delenv(linear_table.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = linear_table.cache_path()
    assert path.parent == tmp_path / "sparrow_sgl" and f"torch{torch.__version__}" in path.name


def test_a_broken_cache_is_ignored_and_rewritten_and_an_unwritable_one_skipped(tmp_path, capsys):
    path = tmp_path / "choices.json"
    for broken in ("{not json", "[1, 2]", json.dumps({"Fake GPU": {"k": [1, 2]}})):
        path.write_text(broken)
        assert linear_table.read_cache(path) == {}
        assert "ignoring the GEMM choice cache" in capsys.readouterr().err
    linear_table.remember(path, "Fake GPU", "k", (64, 128, 2, 4, 3))
    assert linear_table.read_cache(path) == {"Fake GPU": {"k": [64, 128, 2, 4, 3]}}
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    linear_table.remember(blocked / "sub" / "choices.json", "Fake GPU", "k", None)  # reported, not raised
    assert "cannot write the GEMM choice cache" in capsys.readouterr().err


def _remember_many(path: str, worker: int) -> None:
    for i in range(15):
        linear_table.remember(Path(path), "Fake GPU", f"{worker},{i}", None if i % 2 else (64, 64, 1, 4, 3))


def test_processes_writing_the_cache_at_once_lose_no_entry(tmp_path):
    """A run's rollout actors time their shapes at the same moment: every entry survives, the file stays valid."""
    path = tmp_path / "choices.json"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_remember_many, args=(str(path), w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert len(linear_table.read_cache(path)["Fake GPU"]) == 4 * 15


def test_a_malformed_choice_in_a_table_names_it(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"Fake GPU": {"32,64,128,bfloat16,0,0,0": [64, 0, 2, 4, 3]}}))
    monkeypatch.setenv(linear_table.TABLE_ENV, str(path))
    with pytest.raises(ConfigError, match="32,64,128,bfloat16,0,0,0"):
        linear_table.load_table()


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(linear_mod.LINEAR_ENV, "fast")
    with pytest.raises(ValueError, match="SPARROW_LINEAR"):
        linear_mod.linear_mode()


@needs_triton
def test_splits_are_never_empty_and_candidates_fit_the_workspace():
    from sparrow_sgl.attention.kernels import triton_linear as tl

    for n, k in [(2560, 4096), (6144, 2560), (151936, 2560), (100, 200), (64, 64)]:
        for block_k in (64, 128, 256):
            split = tl.fit_split(n, k, 64, block_k, 4 * 132)
            k_blocks = -(-k // block_k)
            assert 1 <= split <= k_blocks and (split - 1) * -(-k_blocks // split) < k_blocks
        for m in (1, 32, 64):
            configs = tl.candidates(m, n, k, torch.device("cpu"))
            assert configs and all(tl.workspace_bytes(m, n, c) <= tl.MAX_WORKSPACE_BYTES for c in configs)
            assert tl.workspace_bytes(m, n, tl.default_config(m, n, k, torch.device("cpu"))) <= tl.MAX_WORKSPACE_BYTES


# ---------------------------------------------------------------- the kernel (GPU or interpreter)

CASES = [  # M, N, K, bias, silu, (block_n, block_k, split_k): ragged N and K, split-K, single rows
    (1, 64, 128, False, False, (64, 128, 1)),
    (5, 100, 200, True, False, (64, 64, 3)),
    (16, 130, 96, False, True, (64, 32, 2)),
    (33, 200, 320, True, False, (128, 64, 4)),
    (64, 96, 256, False, True, (64, 64, 4)),
    (64, 257, 72, True, True, (128, 32, 3)),
    (7, 90, 600, True, False, (32, 256, 2)),  # the narrow / 256-wide-K tiles (session 8)
    (40, 300, 512, False, True, (32, 128, 3)),
    (32, 130, 768, False, False, (64, 256, 2)),
    (3, 48, 40, False, False, None),  # default config
]


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}n{}k{}{}{}".format(*c[:3], "b" * c[3], "s" * c[4]))
def test_kernel_matches_float32_reference(device, case):
    from sparrow_sgl.attention.kernels import triton_linear as tl

    m, n, k, bias, silu, tile = case
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, 2 * k if silu else k, generator=g).bfloat16().to(device)
    w = (torch.randn(n, k, generator=g) * k**-0.5).bfloat16().to(device)
    b = torch.randn(n, generator=g).bfloat16().to(device) if bias else None
    config = tl.Config(*tile, 4, 3) if tile else None
    out = tl.linear(x, w, b, config, silu_input=silu)
    assert out.dtype == torch.bfloat16 and out.device == x.device
    _check(out, _reference(x, w, b, silu))
    assert torch.equal(tl.linear(x, w, b, config, silu_input=silu), out)  # deterministic split-K reduction
    assert not tl.workspace(x.device, 0, 0)[1].any()  # every tile counter back at 0: graph replays need no memset


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_float16_and_strided_rows(device):
    from sparrow_sgl.attention.kernels import triton_linear as tl

    g = torch.Generator().manual_seed(3)
    big = torch.randn(9, 300, generator=g).half().to(device)
    x = big[:, 20:148]  # rows 300 apart
    w = (torch.randn(70, 128, generator=g) * 0.1).half().to(device)
    out = tl.linear(x, w, None, tl.Config(64, 64, 2, 4, 3))
    assert out.dtype == torch.float16
    _check(out, _reference(x, w, None, False))


# ---------------------------------------------------------------- GPU: auto choice, graphs, the engine

@pytest.mark.gpu
def test_auto_times_once_per_shape_and_matches_cublas(monkeypatch):
    calls = []
    real = linear_mod.time_choices
    monkeypatch.setattr(linear_mod, "time_choices", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = Linear(1024, 3000, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(32, 1024, device="cuda", dtype=torch.bfloat16)
    first, second = layer(x), layer(x)
    assert len(calls) == 1 and len(linear_mod.chosen()) == 1
    assert torch.equal(first, second)
    _check(first, _reference(x, layer.weight, None, False))


@pytest.mark.gpu
def test_a_shape_timed_once_is_remembered_for_the_next_process(monkeypatch):
    """A shape no table holds: timed, written to the machine cache; a fresh process (empty in-memory choices) takes
    the cached choice without timing and computes the same bits."""
    layer = Linear(1024, 3000, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(32, 1024, device="cuda", dtype=torch.bfloat16)
    first = layer(x)
    assert len(linear_table.read_cache(linear_table.cache_path())[torch.cuda.get_device_name()]) == 1
    monkeypatch.setattr(linear_mod, "_CHOICES", {})
    monkeypatch.setattr(linear_mod, "time_choices", lambda *a, **k: pytest.fail("timed a remembered shape"))
    assert torch.equal(layer(x), first)


@pytest.mark.gpu
def test_the_shipped_table_serves_this_gpu_without_timing(monkeypatch):
    """On a GPU the table names (the H200), qwen3-4b's o_proj at 32 rows runs the measured choice, untimed."""
    if torch.cuda.get_device_name() not in linear_table.load_table():
        pytest.skip(f"no shipped choices for {torch.cuda.get_device_name()}")
    monkeypatch.setattr(linear_mod, "time_choices", lambda *a, **k: pytest.fail("timed a shipped shape"))
    layer = Linear(4096, 2560, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    _check(layer(x), _reference(x, layer.weight, None, False))
    assert len(linear_mod.chosen()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_triton_linear_in_a_cuda_graph_replays_exactly(monkeypatch, pdl):
    if pdl and not _sm90():
        pytest.skip("programmatic dependent launch needs sm_90+")
    from sparrow_sgl.attention.kernels import triton_linear as tl

    monkeypatch.setenv(linear_mod.LINEAR_ENV, "triton")
    monkeypatch.setenv(linear_mod.PDL_ENV, "1" if pdl else "0")
    torch.manual_seed(1)
    up = Linear(512, 2 * 1400, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    down = Linear(1400, 256, bias=True, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    assert tl.default_config(24, 256, 1400, torch.device("cuda")).split_k > 1  # the in-launch reduction is captured
    x = torch.randn(24, 512, device="cuda", dtype=torch.bfloat16)

    def step():
        return down.forward_silu_mul(up(x))

    eager = step()
    _check(eager, _reference(up(x), down.weight, down.bias, True))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, step())
    assert not tl.workspace(x.device, 0, 0)[1].any()


@pytest.mark.gpu
def test_engine_greedy_tokens_triton_vs_cublas(tiny_model_dir, monkeypatch):
    """bf16 tiny Qwen3 through the CUDA-graph decode. The GEMMs sum in a different order than cuBLAS, so a greedy
    token may differ only where the cuBLAS model has a near-tie (as in test_fused_gpu): every token generated with
    the Triton GEMMs (forced, forced + PDL, auto) is the cuBLAS model's argmax up to 0.02 nats, and the decode
    log-probs (Triton GEMMs) match the teacher-forced ones (one prefill, cuBLAS) of the same tokens."""
    from sparrow_sgl.attention.kernels import triton_linear as tl

    launches = []
    real = tl.linear
    monkeypatch.setattr(tl, "linear", lambda *a, **k: launches.append(k.get("silu_input", False)) or real(*a, **k))
    prompts = random_prompts([30, 52, 9, 70], seed=5)
    params = SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True)
    variants = [("triton", "0"), ("auto", "0")] + ([("triton", "1")] if _sm90() else []) + [("cublas", "0")]
    rollouts = {}
    for mode, pdl in variants:
        monkeypatch.setenv(linear_mod.LINEAR_ENV, mode)
        monkeypatch.setenv(linear_mod.PDL_ENV, pdl)
        launches.clear()
        engine = make_engine(tiny_model_dir, device="cuda", dtype="bfloat16", page_size=16, num_kv_pages=256)
        rollouts[mode, pdl] = engine.generate(prompts, params, schedule="dense", progress=False)
        if mode == "triton":
            assert launches and any(launches) and not all(launches)  # plain and SiLU-fused GEMMs were captured
        if mode == "cublas":
            assert not launches
    for variant, got in rollouts.items():
        scores = engine.score(prompts, [r.token_ids for r in got], return_full=True)  # M > 64: cuBLAS
        for rollout, score in zip(got, scores):
            lp = score.full_logprobs
            chosen = lp.gather(1, torch.tensor(rollout.token_ids)[:, None])[:, 0]
            assert (lp.max(-1).values - chosen).max() <= 0.02, variant
            torch.testing.assert_close(torch.tensor(rollout.logprobs), score.logprobs, atol=5e-2, rtol=0)
