"""CUDA-graph hooks of the sparrow SGLang backend, driven exactly as SGLang 0.5.23's DecodeCudaGraphRunner drives them.

Two identical worlds (real `ReqToTokenPool` + `MHATokenToKVPool`, real `ForwardBatch`es, the same random q/k/v) run
the same requests: one decodes eagerly (`init_forward_metadata` + `forward_decode`), the other through the graph
hooks: `init_cuda_graph_state(max_bs)`, a capture-time `init_forward_metadata_out_graph(fb, in_capture=True)` +
`init_forward_metadata_in_graph(fb)` per captured batch size, then per step the runner's static buffers refilled
with padding (req_pool_index 0, seq_len = fill value, out_cache_loc 0), SGLang's own `build_replay_fb_view`, the
replay-time `init_forward_metadata_out_graph(view)` and the recorded part (in-graph prep + forward_decode on the
capture batch). On CPU the recorded part is re-run; on CUDA (`test_sglang_graph_gpu.py`) it is a real
`torch.cuda.graph` replay. Outputs of the live rows, page summaries and `meta_info["sparrow"]` accounting must match.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sparrow_sgl.sglang import cpu_support  # noqa: E402

cpu_support.apply()

from sparrow_sgl.sglang import request_state  # noqa: E402
from sparrow_sgl.sglang.request_state import REGISTRY  # noqa: E402

pytestmark = pytest.mark.sglang

PAGE = 16
SCHEDULES = {  # per request: dense, two fixed budgets, one that turns sparse at 64 tokens (bins of 64)
    "a": "dense",
    "b": "fixed:48",
    "c": "fixed:64",
    "d": '{"budgets": [null, 48], "bin_tokens": 64, "name": "late"}',
}
PROMPTS = {"a": 40, "b": 70, "c": 51, "d": 50}


class World:
    """Real SGLang pools + our backend; deterministic page allocation so that two worlds share every index."""

    def __init__(self, device="cpu", dtype=torch.float32, layers=4, q_heads=4, kv_heads=2, dim=16, pages=96,
                 max_bs=8, max_context=256, seed=0, server_args=None) -> None:
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

        from sparrow_sgl.sglang.backend import SparrowAttnBackend

        self.device, self.dtype, self.layers_n = torch.device(device), dtype, layers
        self.q_heads, self.kv_heads, self.dim, self.max_context = q_heads, kv_heads, dim, max_context
        self.req_pool = ReqToTokenPool(size=max_bs * 2, max_context_len=max_context, device=device,
                                       enable_memory_saver=False)
        self.kv_pool = MHATokenToKVPool(size=pages * PAGE, page_size=PAGE, dtype=dtype, head_num=kv_heads,
                                        head_dim=dim, layer_num=layers, device=device, enable_memory_saver=False,
                                        enable_alt_stream=False)
        self.runner = model_runner(device, self.req_pool, self.kv_pool, layers, q_heads, kv_heads, dim, max_context,
                                   server_args)
        self.backend = SparrowAttnBackend(self.runner)
        self.free_pages = list(range(1, self.kv_pool.get_key_buffer(0).shape[0] // PAGE))  # page 0: padding
        random.Random(seed).shuffle(self.free_pages)
        self.slots: dict[str, int] = {}
        self.lengths: dict[str, int] = {}
        self.layers = [attention_layer(i, q_heads, kv_heads, dim) for i in range(layers)]

    def admit(self, rid: str, schedule: str) -> None:
        REGISTRY.add(rid, {"sparrow_schedule": schedule})
        slot = self.req_pool.alloc_rows(1)[0]
        n_pages = self.max_context // PAGE
        pages, self.free_pages = self.free_pages[:n_pages], self.free_pages[n_pages:]
        slots = torch.tensor([p * PAGE + o for p in pages for o in range(PAGE)], dtype=torch.int32)
        self.req_pool.req_to_token[slot, : len(slots)] = slots.to(self.device)
        self.slots[rid] = slot

    def batch(self, mode: str, rids: list[str], new_tokens: list[int]):
        """A real ForwardBatch for `rids`, each growing by its `new_tokens` (lengths updated)."""
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        for rid, t in zip(rids, new_tokens):
            self.lengths[rid] = self.lengths.get(rid, 0) + t
        lengths = [self.lengths[r] for r in rids]
        slots = torch.tensor([self.slots[r] for r in rids], device=self.device)
        r2t = self.req_pool.req_to_token
        locs = torch.cat([r2t[s, n - t : n] for s, n, t in zip(slots.tolist(), lengths, new_tokens)]).long()
        positions = torch.cat([torch.arange(n - t, n) for n, t in zip(lengths, new_tokens)]).to(self.device)
        seq = torch.tensor(lengths, device=self.device)
        extend = mode == "EXTEND"
        return ForwardBatch(
            forward_mode=getattr(ForwardMode, mode),
            batch_size=len(rids),
            input_ids=torch.zeros(len(locs), dtype=torch.long, device=self.device),
            req_pool_indices=slots,
            seq_lens=seq,
            out_cache_loc=locs,
            seq_lens_sum=sum(lengths),
            seq_lens_cpu=torch.tensor(lengths),
            positions=positions,
            rids=list(rids),
            extend_prefix_lens=torch.tensor([n - t for n, t in zip(lengths, new_tokens)], device=self.device)
            if extend else None,
            extend_seq_lens=torch.tensor(new_tokens, device=self.device) if extend else None,
            extend_prefix_lens_cpu=[n - t for n, t in zip(lengths, new_tokens)] if extend else None,
            extend_seq_lens_cpu=list(new_tokens) if extend else None,
        )

    def extend(self, rids: list[str], prompt_lens: list[int], qkv) -> None:
        fb = self.batch("EXTEND", rids, prompt_lens)
        self.backend.init_forward_metadata(fb)
        for layer, (q, k, v) in zip(self.layers, qkv):
            self.backend.forward_extend(q, k, v, layer, fb)

    def decode_eager(self, rids: list[str], qkv) -> list[torch.Tensor]:
        fb = self.batch("DECODE", rids, [1] * len(rids))
        self.backend.init_forward_metadata(fb)
        return [self.backend.forward_decode(q, k, v, layer, fb) for layer, (q, k, v) in zip(self.layers, qkv)]

    def random_qkv(self, gen: torch.Generator, n: int):
        def rand(*shape):  # as RadixAttention hands them over: q [n, heads * D], k/v [n, kv_heads, D]
            return torch.randn(n, *shape, generator=gen).to(device=self.device, dtype=self.dtype)

        kv = (self.kv_heads, self.dim)
        return [(rand(self.q_heads * self.dim), rand(*kv), rand(*kv)) for _ in range(self.layers_n)]


class GraphRunner:
    """The hook sequence of SGLang's DecodeCudaGraphRunner (capture per bs, padded replay) over one World."""

    def __init__(self, world: World, capture_bs=(1, 2, 4, 8), use_cuda_graph: bool = False) -> None:
        self.world, self.capture_bs, self.max_bs = world, tuple(capture_bs), max(capture_bs)
        backend, dev, bs = world.backend, world.device, self.max_bs
        backend.init_cuda_graph_state(bs, bs)
        self.fill = backend.get_cuda_graph_seq_len_fill_value()
        self.buffers = SimpleNamespace(
            input_ids=torch.zeros(bs, dtype=torch.long, device=dev),
            positions=torch.zeros(bs, dtype=torch.long, device=dev),
            req_pool_indices=torch.zeros(bs, dtype=torch.long, device=dev),
            seq_lens=torch.full((bs,), self.fill, dtype=torch.long, device=dev),
            seq_lens_cpu=torch.full((bs,), self.fill, dtype=torch.long),
            out_cache_loc=torch.zeros(bs, dtype=torch.long, device=dev),
            encoder_lens=None,
            mamba_track_indices=None,
        )
        w = world
        self.q = [torch.zeros(bs, w.q_heads * w.dim, dtype=w.dtype, device=dev) for _ in w.layers]
        self.k = [torch.zeros(bs, w.kv_heads, w.dim, dtype=w.dtype, device=dev) for _ in w.layers]
        self.v = [torch.zeros(bs, w.kv_heads, w.dim, dtype=w.dtype, device=dev) for _ in w.layers]
        self.batches, self.outputs, self.graphs = {}, {}, {}
        for size in reversed(self.capture_bs):  # SGLang captures the largest first
            self._capture(size, use_cuda_graph)

    def _capture_batch(self, bs: int):
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        b = self.buffers
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=b.input_ids[:bs],
            req_pool_indices=b.req_pool_indices[:bs], seq_lens=b.seq_lens[:bs], out_cache_loc=b.out_cache_loc[:bs],
            seq_lens_sum=int(b.seq_lens[:bs].sum()), seq_lens_cpu=b.seq_lens_cpu[:bs], positions=b.positions[:bs],
            orig_seq_lens=b.seq_lens[:bs],
        )

    def _recorded(self, bs: int) -> list[torch.Tensor]:
        """What SGLang records in the graph: the in-graph prep, then every layer's attention."""
        backend, fb = self.world.backend, self.batches[bs]
        backend.init_forward_metadata_in_graph(fb)
        return [backend.forward_decode(q[:bs], k[:bs], v[:bs], layer, fb)
                for layer, q, k, v in zip(self.world.layers, self.q, self.k, self.v)]

    def _capture(self, bs: int, use_cuda_graph: bool) -> None:
        fb = self.batches[bs] = self._capture_batch(bs)
        self.world.backend.init_forward_metadata_out_graph(fb, in_capture=True)
        if not use_cuda_graph:
            self.outputs[bs] = self._recorded(bs)  # warm-up run
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._recorded(bs)  # warm-up (compiles the Triton kernels)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs[bs] = self._recorded(bs)
        self.graphs[bs] = graph

    def replay(self, rids: list[str], qkv, junk: torch.Generator) -> list[torch.Tensor]:
        from sglang.srt.model_executor.forward_batch_info import ForwardMode
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view

        w = self.world
        fb = w.batch("DECODE", rids, [1] * len(rids))  # the live batch SGLang hands the graph runner
        raw = fb.batch_size
        bs = next(size for size in self.capture_bs if size >= raw)
        b = self.buffers
        for name, pad in (("req_pool_indices", 0), ("seq_lens", self.fill), ("out_cache_loc", 0), ("positions", 0)):
            buf = getattr(b, name)
            buf[:raw] = getattr(fb, name)
            buf[raw:bs] = pad
        b.seq_lens_cpu[:raw] = fb.seq_lens_cpu
        b.seq_lens_cpu[raw:bs] = self.fill
        for static, given in zip((self.q, self.k, self.v), zip(*qkv)):
            for buf, x in zip(static, given):
                buf[:raw] = x
                buf[raw:bs] = torch.randn(bs - raw, *buf.shape[1:], generator=junk).to(buf)  # padded rows: junk
        view = build_replay_fb_view(forward_batch=fb, buffers=b, bs=bs, raw_bs=raw, num_tokens=bs,
                                    global_num_tokens_cpu=None, seq_len_fill_value=self.fill,
                                    capture_forward_mode=ForwardMode.DECODE, is_encoder_decoder=False)
        w.backend.init_forward_metadata_out_graph(view)
        if bs in self.graphs:
            self.graphs[bs].replay()
            outputs = self.outputs[bs]
        else:
            outputs = self._recorded(bs)
        return [out[:raw].clone() for out in outputs]


def model_runner(device, req_pool, kv_pool, layers, q_heads, kv_heads, dim, max_context, server_args=None):
    """What the backends read off SGLang's ModelRunner (as SGLang's own attention test kit mocks it)."""
    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator

    hf_config = SimpleNamespace(architectures=["Qwen3ForCausalLM"])
    model_config = SimpleNamespace(
        num_hidden_layers=layers, hf_config=hf_config, num_attention_heads=q_heads, num_key_value_heads=kv_heads,
        context_len=max_context, is_multimodal=False, is_encoder_decoder=False, head_dim=dim, v_head_dim=dim,
        get_num_kv_heads=lambda tp_size, dcp_size=1: kv_heads, get_max_num_attention_heads=lambda: q_heads,
        get_num_attention_heads=lambda tp_size: q_heads,
    )
    dtype = kv_pool.get_key_buffer(0).dtype
    allocator = SimpleNamespace(page_size=PAGE, get_kvcache=lambda: kv_pool)
    translator = KVIndexTranslator(req_to_token=req_pool.req_to_token, token_to_kv_pool_allocator=allocator,
                                   token_to_kv_pool=kv_pool, page_size=PAGE, device=device, is_draft_worker=False)
    return SimpleNamespace(
        device=device, gpu_id=0, page_size=PAGE, req_to_token_pool=req_pool, token_to_kv_pool=kv_pool,
        token_to_kv_pool_allocator=allocator, kv_index_translator=translator, model_config=model_config,
        use_mla_backend=False, sliding_window_size=None, is_draft_worker=False, is_hybrid_swa=False,
        kv_cache_dtype=dtype, dtype=dtype, init_new_workspace=False, attention_chunk_size=None,
        prefill_attention_backend_str="flashinfer", decode_attention_backend_str="flashinfer",
        server_args=server_args or SimpleNamespace(enable_mixed_chunk=False, speculative_algorithm=None),
    )


def publish_server_args(prefill: str = "disabled"):
    """Install the dummy server config SGLang's backends read through `get_exec()` & co (SGLang's test-kit way):
    decode graphs on, prefill graphs off (or `prefill`). Returns (override, server_args); `.restore()` the override."""
    from sglang.srt.model_executor.cuda_graph_config import Backend, CudaGraphConfig, PhaseConfig
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args(
        attention_backend="flashinfer", chunked_prefill_size=-1, disable_radix_cache=False, dllm_algorithm=None,
        dllm_algorithm_config=None, dp_size=1, enable_deterministic_inference=False, enable_mis=False,
        is_embedding=False, kv_cache_dtype="auto", max_running_requests=None, pp_size=1, revision=None,
        speculative_algorithm=None, speculative_eagle_topk=0, speculative_num_draft_tokens=0,
        speculative_num_steps=0, tp_size=1, triton_attention_num_kv_splits=8, triton_attention_split_tile_size=None,
        cuda_graph_config=CudaGraphConfig(decode=PhaseConfig(backend=Backend.FULL),
                                          prefill=PhaseConfig(backend=prefill)),
    )
    return override, override.install()


def attention_layer(layer_id: int, q_heads: int, kv_heads: int, dim: int):
    """SGLang's own attention layer object (only its attributes are read: the tests call the backend directly)."""
    from sglang.srt.layers.radix_attention import RadixAttention

    return RadixAttention(num_heads=q_heads, head_dim=dim, scaling=dim**-0.5, num_kv_heads=kv_heads, layer_id=layer_id)


def run_both(device="cpu", dtype=torch.float32, steps=40, use_cuda_graph=False, atol=1e-5, prompt_scale=1,
             **world_kw):
    """Prefill four requests in both worlds, decode them (batches of 4, 3, 2 and 1: padded rows), compare.

    Returns (max abs difference over all live outputs, eager reports, graph reports, the two worlds).
    """
    request_state.server_schedule.cache_clear()
    eager, graph = World(device, dtype, **world_kw), World(device, dtype, **world_kw)
    runner = GraphRunner(graph, use_cuda_graph=use_cuda_graph)  # at start-up, before any request (as SGLang)
    gen, junk = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for world, prefix in ((eager, "e"), (graph, "g")):
        for rid, schedule in SCHEDULES.items():
            world.admit(prefix + rid, schedule)
    rids = list(SCHEDULES)
    prompt_lens = [PROMPTS[r] * prompt_scale for r in rids]
    qkv = eager.random_qkv(gen, sum(prompt_lens))
    eager.extend(["e" + r for r in rids], prompt_lens, qkv)
    graph.extend(["g" + r for r in rids], prompt_lens, qkv)
    worst = 0.0
    for step in range(steps):
        live = rids if step < steps // 2 else rids[1:] if step < 3 * steps // 4 else ["a", "d"]
        live = ["a"] if step >= steps - 2 else live  # an all-dense batch: eager hands it to the stock backend
        qkv = eager.random_qkv(gen, len(live))
        want = eager.decode_eager(["e" + r for r in live], qkv)
        if step == steps // 2 + 1:  # a batch the graph cannot take (e.g. above max bs) runs eagerly in between
            got = graph.decode_eager(["g" + r for r in live], qkv)
        else:
            got = runner.replay(["g" + r for r in live], qkv, junk)
        for layer, (w, g) in enumerate(zip(want, got)):
            diff = (w.float() - g.float()).abs().max().item()
            worst = max(worst, diff)
            assert diff <= atol, f"step {step} layer {layer}: graph decode differs from eager by {diff}"
    reports = {w: {r: REGISTRY.pop_report(w + r) for r in rids} for w in ("e", "g")}
    return worst, reports["e"], reports["g"], (eager, graph)


@pytest.fixture
def clean_registry():
    yield
    REGISTRY.active = False
    REGISTRY.slot_reader = None
    request_state.server_schedule.cache_clear()


def test_graph_hooks_replay_equals_eager_decode_with_mixed_schedules_and_padding(clean_registry):
    worst, eager_reports, graph_reports, (eager, graph) = run_both(steps=24)
    assert worst <= 1e-5
    for rid in SCHEDULES:
        e, g = eager_reports[rid], graph_reports[rid]
        assert e["schedule"] == g["schedule"] and e["sparse_layer_steps"] == g["sparse_layer_steps"] > 0
        assert g["kv_tokens_mean"] == pytest.approx(e["kv_tokens_mean"], rel=1e-6)
    assert graph_reports["a"]["kv_tokens_mean"] > graph_reports["b"]["kv_tokens_mean"]  # dense attends everything
    assert graph_reports["b"]["kv_tokens_mean"] <= 48
    for layer_id, mine in graph.backend.summaries.items():  # summaries kept identically (padding wrote page 0 only)
        theirs = eager.backend.summaries[layer_id]
        torch.testing.assert_close(mine.key_sum[1:], theirs.key_sum[1:])
        assert torch.equal(mine.count[1:], theirs.count[1:])


def test_replayed_budgets_follow_each_slots_schedule(clean_registry):
    """The per-slot table gives a replayed row the budget of its own request's schedule at its current length."""
    request_state.server_schedule.cache_clear()
    world = World()
    runner = GraphRunner(world)
    for rid, schedule in SCHEDULES.items():
        world.admit(rid, schedule)
    gen = torch.Generator().manual_seed(0)
    world.extend(list(SCHEDULES), list(PROMPTS.values()), world.random_qkv(gen, sum(PROMPTS.values())))
    runner.replay(list(SCHEDULES), world.random_qkv(gen, 4), gen)
    state = world.backend.graph
    lengths = [world.lengths[r] for r in SCHEDULES]
    expected = []
    for rid, n in zip(SCHEDULES, lengths):
        budget = request_state.parse_schedule(SCHEDULES[rid]).budget_at(n)
        n_pages = -(-n // PAGE)
        expected.append(n_pages if budget is None else min(budget // PAGE, n_pages))
    assert state.budget_pages[:4].tolist() == expected
    assert state.seq_lens[:4].tolist() == lengths


def test_capture_accounts_nothing_and_hooks_refuse_missing_state(clean_registry):
    from sparrow_sgl.config import ConfigError

    request_state.server_schedule.cache_clear()
    world = World()
    runner = GraphRunner.__new__(GraphRunner)
    runner.buffers = SimpleNamespace(**{n: torch.zeros(1, dtype=torch.long) for n in (
        "input_ids", "positions", "req_pool_indices", "out_cache_loc", "seq_lens", "seq_lens_cpu")})
    with pytest.raises(ConfigError, match="init_cuda_graph_state"):
        world.backend.init_forward_metadata_out_graph(runner._capture_batch(1), in_capture=True)
    GraphRunner(world)  # capture-time warm-ups run with every row marked padding
    assert float(world.backend.graph.slot_kv_tokens.sum()) == 0.0 and int(world.backend.graph.slot_steps.sum()) == 0


def test_sparrow_serve_keeps_decode_graphs_on_gpu_with_an_opt_out(tiny_model_dir):
    from sparrow_sgl.sglang.serve import ServerSpec

    sparse = ServerSpec(model=str(tiny_model_dir), schedule="fixed:64", device="cuda").argv()
    assert "--disable-cuda-graph" not in sparse and "--disable-prefill-cuda-graph" in sparse
    dense = ServerSpec(model=str(tiny_model_dir), dense=True, device="cuda").argv()
    assert "--disable-prefill-cuda-graph" in dense  # the baseline runs with the same settings
    eager = ServerSpec(model=str(tiny_model_dir), schedule="fixed:64", device="cuda", cuda_graph=False).argv()
    assert "--disable-cuda-graph" in eager
    cpu = ServerSpec(model=str(tiny_model_dir), schedule="fixed:64", device="cpu").argv()
    assert not any("cuda-graph" in a for a in cpu)


def test_backend_refuses_captured_prefill(clean_registry):
    from sparrow_sgl.config import ConfigError

    override, args = publish_server_args(prefill="breakable")
    try:
        with pytest.raises(ConfigError, match="--disable-prefill-cuda-graph"):
            World(server_args=args)
    finally:
        override.restore()
    World()  # nothing published (or prefill graphs off): accepted


def test_retracted_requests_keep_their_graph_step_accounting(clean_registry):
    """A request retracted mid-decode (slot freed, later admitted again into another slot) keeps the graph steps it
    made; the one that took over its old slot starts from zero. Reports equal the eager world's."""
    request_state.server_schedule.cache_clear()
    eager, graph = World(), World()
    runner = GraphRunner(graph)
    gen, junk = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    schedules = {"a": "fixed:48", "b": "fixed:64", "c": "fixed:48"}

    def both(rids, extend_lens=None):  # the same step in both worlds: an extend of these lengths, else a decode
        qkv = eager.random_qkv(gen, sum(extend_lens) if extend_lens else len(rids))
        for world, prefix in ((eager, "e"), (graph, "g")):
            names = [prefix + r for r in rids]
            if extend_lens:
                world.extend(names, extend_lens, qkv)
            elif world is eager:
                eager.decode_eager(names, qkv)
            else:
                runner.replay(names, qkv, junk)

    for world, prefix in ((eager, "e"), (graph, "g")):
        for rid in ("a", "b"):
            world.admit(prefix + rid, schedules[rid])
    both(["a", "b"], [60, 60])
    for _ in range(3):
        both(["a", "b"])
    for world, prefix in ((eager, "e"), (graph, "g")):  # retract b: its slot goes back to the pool, c takes it
        world.req_pool.free_rows([world.slots[prefix + "b"]])
        world.admit(prefix + "c", schedules["c"])
    assert graph.slots["gc"] != graph.slots["ga"]
    both(["c"], [60])
    for _ in range(2):
        both(["a", "c"])
    for world, prefix in ((eager, "e"), (graph, "g")):  # b comes back in a fresh slot and re-prefills what it had
        rid = prefix + "b"
        world.slots[rid] = world.req_pool.alloc_rows(1)[0]
        per_request = world.max_context // PAGE
        pages, world.free_pages = world.free_pages[:per_request], world.free_pages[per_request:]
        locs = torch.tensor([p * PAGE + o for p in pages for o in range(PAGE)], dtype=torch.int32)
        world.req_pool.req_to_token[world.slots[rid], : len(locs)] = locs
        n = world.lengths.pop(rid)
    both(["b"], [n])
    for _ in range(2):
        both(["a", "b", "c"])
    reports = {p: {r: REGISTRY.pop_report(p + r) for r in schedules} for p in ("e", "g")}
    for rid, steps in (("a", 7), ("b", 5), ("c", 4)):
        e, g = reports["e"][rid], reports["g"][rid]
        assert e["sparse_layer_steps"] == g["sparse_layer_steps"] == steps * 2  # two sparse layers of four
        assert g["kv_tokens_mean"] == pytest.approx(e["kv_tokens_mean"], rel=1e-6)
