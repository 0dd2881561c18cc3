"""The sparrow SGLang plugin without a server: backend on fake pools, schedules, hooks, launcher, CPU patches."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sparrow_sgl.attention import PageSummaries, sparse_decode  # noqa: E402
from sparrow_sgl.config import ConfigError, Schedule  # noqa: E402
from sparrow_sgl.sglang import request_state  # noqa: E402
from sparrow_sgl.sglang.hooks import strip_schedule_flag  # noqa: E402
from sparrow_sgl.sglang.request_state import REGISTRY, RequestRegistry, parse_schedule, request_schedule  # noqa: E402
from sparrow_sgl.sglang.serve import ServerSpec, check_model_dir  # noqa: E402

pytestmark = pytest.mark.sglang

PAGE, KV_HEADS, Q_HEADS, DIM, LAYERS = 16, 2, 4, 16, 4


# -- schedules and request state ----------------------------------------------------------------------------------
def test_parse_schedule_accepts_names_json_objects_and_json_strings():
    assert parse_schedule("fixed:64").budget_at(10_000) == 64
    assert parse_schedule("dense").is_dense
    assert parse_schedule("qwen3-4b-0.86").name == "qwen3-4b-0.86"
    custom = parse_schedule({"budgets": [None, 128], "bin_tokens": 256})
    assert custom.name == "custom" and custom.budget_at(100) is None and custom.budget_at(300) == 128
    assert parse_schedule(json.dumps({"budgets": [64], "name": "x"})).name == "x"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fixed:20", "not a multiple of the page size"),
        ("nope", "unknown schedule"),
        ({"budgets": [128], "page_size": 32}, "page_size"),
        ({"budgets": [64], "scorer": "quest"}, "scorer"),
        ({"budget": [64]}, "unknown key"),
        (12, "must be a schedule name"),
    ],
)
def test_request_schedule_refuses_bad_or_incompatible_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        request_schedule({"sparrow_schedule": spec})


def test_server_default_comes_from_the_environment(monkeypatch):
    request_state.server_schedule.cache_clear()
    monkeypatch.setenv("SPARROW_SCHEDULE", "fixed:96")
    try:
        assert request_schedule(None).budget_at(5000) == 96
        assert request_schedule({"other": 1}).name == "fixed:96"
    finally:
        request_state.server_schedule.cache_clear()


def test_registry_reports_mean_attended_tokens_per_sparse_layer_step():
    reg = RequestRegistry()
    reg.active = True
    reg.add("a", {"sparrow_schedule": "fixed:48"})
    reg.add("b", None)
    reg.record_step(["a", "b"], torch.tensor([64.0, 200.0]), sparse_layers=2)
    reg.record_step(["a"], torch.tensor([60.0]), sparse_layers=2)
    report = reg.pop_report("a")
    assert report == {"schedule": "fixed:48", "kv_tokens_mean": 31.0, "sparse_layer_steps": 4}
    assert reg.pop_report("a") is None and reg.pop_report("b")["kv_tokens_mean"] == 100.0


def test_inactive_registry_tracks_nothing():
    reg = RequestRegistry()
    reg.add("a", {"sparrow_schedule": "fixed:32"})
    assert reg.pop_report("a") is None


# -- launcher and hooks -------------------------------------------------------------------------------------------
def test_schedule_flag_is_taken_out_of_sglang_argv():
    argv = ["--model-path", "m", "--sparrow-schedule", "fixed:64", "--port", "1"]
    assert strip_schedule_flag(argv) == (["--model-path", "m", "--port", "1"], "fixed:64")
    assert strip_schedule_flag(["--sparrow-schedule=dense"]) == ([], "dense")
    assert strip_schedule_flag(["--x"]) == (["--x"], None)


def test_server_spec_command_line(tiny_model_dir):
    spec = ServerSpec(model=str(tiny_model_dir), schedule="fixed:64", device="cpu", port=1234, kv_tokens=4096)
    argv = spec.argv()
    assert argv[argv.index("--attention-backend") + 1] == "sparrow"
    assert argv[argv.index("--page-size") + 1] == "16"
    assert argv[argv.index("--context-length") + 1] == "4096"
    assert spec.env()["SPARROW_SCHEDULE"] == "fixed:64" and spec.url == "http://127.0.0.1:1234"
    dense = ServerSpec(model=str(tiny_model_dir), dense=True, device="cpu")
    assert dense.argv()[dense.argv().index("--attention-backend") + 1] == "torch_native"
    assert "SPARROW_SCHEDULE" not in dense.env()
    timed = ServerSpec(model=str(tiny_model_dir), dense=True, device="cpu", group_timeout_s=90.0)
    assert timed.env()["SPARROW_WEIGHTS_GROUP_TIMEOUT_S"] == "90"


def test_server_spec_refuses_bad_inputs(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ConfigError, match="unsupported model architecture"):
        check_model_dir(tmp_path)
    with pytest.raises(ConfigError, match="not a multiple"):
        ServerSpec(model=str(tiny_model_dir), schedule="fixed:33", device="cpu")


def test_sparrow_serve_cli_help():
    from sparrow_sgl.cli import build_parser

    argv = ["serve", "--model", "m", "--schedule", "fixed:64", "--dense"]
    args = build_parser(argv).parse_args(argv)
    assert args.dense and args.schedule == "fixed:64" and args.host == "127.0.0.1"


def test_cpu_patches_make_rotary_native_and_pinning_harmless():
    from sparrow_sgl.sglang import cpu_support

    if not cpu_support.needed():
        pytest.skip("CPU patches only apply without CUDA")
    assert cpu_support.apply()
    import sglang.srt.layers.rotary_embedding.base as rotary_base

    assert rotary_base._is_cpu is True
    t = torch.arange(3)
    assert t.pin_memory() is t
    import sglang.srt.lora.layers as lora_layers

    assert lora_layers.torch.tensor([1, 2], pin_memory=True).tolist() == [1, 2]


def test_plugin_registers_backend_name():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from sparrow_sgl.sglang.plugin import register

    register()
    assert "sparrow" in ATTENTION_BACKENDS and "sparrow" in ATTENTION_BACKEND_CHOICES


# -- the backend on fake SGLang pools -----------------------------------------------------------------------------
class FakeKVPool:
    def __init__(self, num_pages: int) -> None:
        shape = (num_pages * PAGE, KV_HEADS, DIM)
        self.k = [torch.zeros(shape) for _ in range(LAYERS)]
        self.v = [torch.zeros(shape) for _ in range(LAYERS)]

    def get_key_buffer(self, layer_id):
        return self.k[layer_id]

    def get_value_buffer(self, layer_id):
        return self.v[layer_id]

    def set_kv_buffer(self, layer, loc_info, k, v, *args, **kwargs):
        loc = loc_info.loc.long()
        self.k[layer.layer_id][loc] = k.reshape(-1, KV_HEADS, DIM)
        self.v[layer.layer_id][loc] = v.reshape(-1, KV_HEADS, DIM)


def _runner(num_pages: int, page_tables: list[list[int]]):
    req_to_token = torch.zeros(len(page_tables), 256, dtype=torch.int32)
    for row, pages in enumerate(page_tables):
        slots = torch.tensor([p * PAGE + o for p in pages for o in range(PAGE)], dtype=torch.int32)
        req_to_token[row, : len(slots)] = slots
    hf_config = SimpleNamespace(architectures=["Qwen3ForCausalLM"])
    return SimpleNamespace(
        device="cpu",
        page_size=PAGE,
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        token_to_kv_pool=FakeKVPool(num_pages),
        model_config=SimpleNamespace(num_hidden_layers=LAYERS, hf_config=hf_config),
        use_mla_backend=False,
    )


def _layer(layer_id: int):
    from sglang.srt.layers.radix_attention import AttentionType

    return SimpleNamespace(
        layer_id=layer_id,
        tp_q_head_num=Q_HEADS,
        tp_k_head_num=KV_HEADS,
        qk_head_dim=DIM,
        v_head_dim=DIM,
        scaling=DIM**-0.5,
        is_cross_attention=False,
        attn_type=AttentionType.DECODER,
        sliding_window_size=None,
        logit_cap=0.0,
    )


def _batch(mode, rids, lengths, new_tokens, req_to_token):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    rows = torch.arange(len(rids))
    locs = torch.cat([req_to_token[r, n - t : n] for r, n, t in zip(rows.tolist(), lengths, new_tokens)]).long()
    return SimpleNamespace(
        forward_mode=mode if not isinstance(mode, str) else getattr(ForwardMode, mode),
        rids=rids,
        req_pool_indices=rows,
        seq_lens=torch.tensor(lengths),
        seq_lens_cpu=torch.tensor(lengths),
        extend_prefix_lens=torch.tensor([n - t for n, t in zip(lengths, new_tokens)]),
        extend_seq_lens=torch.tensor(new_tokens),
        encoder_lens=None,
        out_cache_loc=locs,
        out_cache_loc_is_physical=True,
        encoder_out_cache_loc=None,
    )


def test_backend_matches_reference_sparse_decode_and_keeps_summaries_incrementally(monkeypatch):
    from sparrow_sgl.sglang.backend import SparrowAttnBackend

    request_state.server_schedule.cache_clear()
    monkeypatch.setenv("SPARROW_SCHEDULE", "fixed:48")
    page_tables = [[3, 7, 1, 9, 12, 4], [5, 2, 10, 0, 8, 6]]
    runner = _runner(16, page_tables)
    try:
        backend = SparrowAttnBackend(runner)
        REGISTRY.add("a", None)  # server default fixed:48
        REGISTRY.add("b", {"sparrow_schedule": "fixed:64"})
        torch.manual_seed(0)
        prompt = [70, 51]
        fb = _batch("EXTEND", ["a", "b"], prompt, prompt, runner.req_to_token_pool.req_to_token)
        backend.init_forward_metadata(fb)
        layers = [_layer(i) for i in range(LAYERS)]
        for layer in layers:
            n = sum(prompt)
            q, k, v = torch.randn(n, Q_HEADS * DIM), torch.randn(n, KV_HEADS * DIM), torch.randn(n, KV_HEADS * DIM)
            backend.forward_extend(q, k, v, layer, fb)
        lengths = list(prompt)
        for _ in range(20):  # decode steps: summaries must follow, selection must match the reference
            lengths = [n + 1 for n in lengths]
            fb = _batch("DECODE", ["a", "b"], lengths, [1, 1], runner.req_to_token_pool.req_to_token)
            backend.init_forward_metadata(fb)
            for layer in layers:
                q, k, v = torch.randn(2, Q_HEADS * DIM), torch.randn(2, KV_HEADS * DIM), torch.randn(2, KV_HEADS * DIM)
                out = backend.forward_decode(q, k, v, layer, fb)
                _check_against_reference(runner, backend, layer, q, lengths, page_tables, out)
        report = REGISTRY.pop_report("b")
        assert report["schedule"] == "fixed:64" and report["sparse_layer_steps"] == 20 * 2
        assert 48 < report["kv_tokens_mean"] <= 64  # 4 of the 4-5 pages of 52-71 tokens
    finally:
        request_state.server_schedule.cache_clear()
        REGISTRY.active = False


def _check_against_reference(runner, backend, layer, q, lengths, page_tables, out):
    pool = runner.token_to_kv_pool
    k_cache = pool.k[layer.layer_id].view(-1, PAGE, KV_HEADS, DIM)
    v_cache = pool.v[layer.layer_id].view(-1, PAGE, KV_HEADS, DIM)
    block_table = torch.tensor(page_tables)
    seq_lens = torch.tensor(lengths)
    cfg = request_state.server_sparsity()
    reference = sparse_decode(
        q.view(2, Q_HEADS, DIM), k_cache, v_cache, block_table, seq_lens, [48, 64], cfg,
        layer=layer.layer_id, scale=layer.scaling,
    )
    torch.testing.assert_close(out.view(2, Q_HEADS, DIM), reference, atol=1e-5, rtol=1e-5)
    if cfg.is_dense_layer(layer.layer_id):
        assert layer.layer_id not in backend.summaries
        return
    scanned = PageSummaries.from_cache(k_cache, block_table, seq_lens, cfg)
    mine = backend.summaries[layer.layer_id]
    used = torch.tensor(sorted({p for row, n in zip(page_tables, lengths) for p in row[: -(-n // PAGE)]}))
    torch.testing.assert_close(mine.key_sum[used], scanned.key_sum[used], atol=1e-4, rtol=1e-5)
    assert torch.equal(mine.count[used], scanned.count[used])
    torch.testing.assert_close(mine.key_max[used], scanned.key_max[used])


def test_backend_refuses_wrong_page_size_and_unknown_architecture(monkeypatch):
    from sparrow_sgl.sglang.backend import SparrowAttnBackend

    runner = _runner(4, [[0]])
    runner.page_size = 1
    with pytest.raises(ConfigError, match="--page-size 16"):
        SparrowAttnBackend(runner)
    runner = _runner(4, [[0]])
    runner.model_config.hf_config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ConfigError, match="does not support architecture"):
        SparrowAttnBackend(runner)
    REGISTRY.active = False


def test_schedule_dataclass_roundtrip_through_client_body():
    from sparrow_sgl.engine import SamplingParams
    from sparrow_sgl.sglang.client import SGLangRolloutClient

    body = SGLangRolloutClient("http://127.0.0.1:1")._request_body(
        [1, 2], SamplingParams(top_k=0, logprobs_topk=3, seed=4), 2, Schedule.fixed(64), "rollout"
    )
    assert body["sampling_params"]["top_k"] == -1 and body["sampling_params"]["sampling_seed"] == 6
    assert parse_schedule(body["sampling_params"]["custom_params"]["sparrow_schedule"]).budget_at(1) == 64
    assert body["lora_path"] == "rollout" and body["top_logprobs_num"] == 3 and body["input_ids"] == [1, 2]
