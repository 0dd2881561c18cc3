"""`sparrow`: an SGLang attention backend with dense prefill and block-sparse decode.

Prefill/extend and the dense layers are delegated to the device's stock backend (torch_native on CPU, FlashInfer on
CUDA), so they are exactly SGLang's. Decode in the other layers runs `sparrow_sgl.attention.sparse_decode` with a
per-request budget: the request's `Schedule` at its current KV length (the token being decoded included), the same
rule as the embedded engine.

Pages: the server runs with `--page-size 16` (the schedule's page size), so SGLang's paged allocator already keeps
logical page j of a request in one physical page (slot // 16) at offset position % 16. The KV buffer of a layer,
[slots, kv_heads, head_dim], is viewed as an NHD paged cache [slots // 16, 16, kv_heads, head_dim]; a request's
block table is `req_to_token[row, ::16] // 16`. Page summaries live per physical page and sparse layer and are
updated incrementally whenever K is written (extend and decode), for every request whatever its schedule, because
a dense request's prompt pages may later serve as a sparse request's cached prefix.

CUDA graphs (`graph_state.py`): on a captured or replayed decode batch the metadata lives in static device buffers
that the captured prep fills from `req_pool_indices` and `seq_lens`; each request's schedule reaches them through a
per-slot table written at its extend. Sparse layers then run the Triton selection + decode (sync-free), dense layers
the stock backend's own graph path. A replayed step treats dense requests of the batch as sparse ones whose budget
covers every page (same attention, Triton instead of the stock kernel in the sparse layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sparrow_sgl.attention import PageSummaries, sparse_decode
from sparrow_sgl.config import ConfigError
from sparrow_sgl.sglang.graph_state import GraphDecodeState
from sparrow_sgl.sglang.request_state import REGISTRY, server_schedule, server_sparsity

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


@dataclass
class GraphStep:
    """Metadata of a captured / replayed decode batch: its rows live in `SparrowAttnBackend.graph` buffers [:bs]."""

    bs: int


@dataclass
class DecodeMetadata:
    block_table: torch.Tensor  # [batch, max_pages] physical page ids
    seq_lens: torch.Tensor  # [batch] KV length including the token being decoded
    budgets: torch.Tensor  # [batch] tokens per (request, KV head); -1 = dense
    all_dense: bool  # every request dense this step: the stock backend serves all layers
    attended: torch.Tensor  # [batch] float32 attended tokens summed over sparse layers (mean over KV heads)


def stock_backend_name(device: str) -> str:
    return "torch_native" if device == "cpu" else "flashinfer"


class SparrowAttnBackend(AttentionBackend):
    def __init__(self, model_runner) -> None:
        super().__init__()
        device = str(model_runner.device).split(":")[0]
        self.inner = ATTENTION_BACKENDS[stock_backend_name(device)](model_runner)
        self.cfg = server_sparsity()
        self.device = model_runner.device
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.page_size = model_runner.page_size
        self._check_supported(model_runner)
        num_layers = model_runner.model_config.num_hidden_layers
        self.num_sparse_layers = sum(1 for i in range(num_layers) if not self.cfg.is_dense_layer(i))
        self.num_layers = num_layers
        self.summaries: dict[int, PageSummaries] = {}
        self.forward_metadata: DecodeMetadata | GraphStep | None = None
        self.graph: GraphDecodeState | None = None  # set by init_cuda_graph_state
        self.inner_has_graphs = device != "cpu"  # torch_native (CPU) has no graph hooks: its eager prep stands in
        REGISTRY.active = True

    def _check_supported(self, model_runner) -> None:
        if self.page_size != self.cfg.page_size:
            raise ConfigError(
                f"the sparrow backend needs --page-size {self.cfg.page_size} (the schedule's page size), got "
                f"{self.page_size}"
            )
        if getattr(model_runner, "use_mla_backend", False):
            raise ConfigError("the sparrow backend serves MHA/GQA models only, not MLA")
        args = getattr(model_runner, "server_args", None)
        if getattr(args, "enable_mixed_chunk", False):  # mixed batches run decode tokens through forward_extend
            raise ConfigError("the sparrow backend does not support --enable-mixed-chunk (decode would turn dense)")
        if getattr(args, "speculative_algorithm", None):
            raise ConfigError("the sparrow backend does not support speculative decoding")
        if _prefill_graphs_on():  # captured extends would skip the per-slot schedule bind and summary updates
            raise ConfigError("the sparrow backend needs eager prefill: launch with --disable-prefill-cuda-graph")
        archs = getattr(model_runner.model_config.hf_config, "architectures", None) or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"the sparrow backend does not support architecture {archs}; supported: {list(SUPPORTED_ARCHITECTURES)}"
            )

    # -- metadata ---------------------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch) -> None:
        self.inner.init_forward_metadata(forward_batch)
        self.forward_metadata = None
        if self.graph is not None and forward_batch.forward_mode.is_extend():
            self._bind_slots(forward_batch)
        if forward_batch.forward_mode.is_decode():
            self.forward_metadata = self._decode_metadata(forward_batch)
            REGISTRY.record_step(forward_batch.rids, self.forward_metadata.attended, self.num_sparse_layers)

    def _decode_metadata(self, forward_batch) -> DecodeMetadata:
        seq_lens_cpu = forward_batch.seq_lens_cpu
        if seq_lens_cpu is None:
            seq_lens_cpu = forward_batch.seq_lens.cpu()
        lengths = seq_lens_cpu.tolist()
        budgets = []
        for rid, length in zip(forward_batch.rids, lengths):
            budget = REGISTRY.get(rid).schedule.budget_at(int(length))
            budgets.append(-1 if budget is None or budget >= length else budget)
        all_dense = all(b < 0 for b in budgets)
        seq_lens = forward_batch.seq_lens.to(torch.long)
        max_pages = -(-max(lengths) // self.page_size)
        rows = self.req_to_token[forward_batch.req_pool_indices.long()]
        block_table = rows[:, : max_pages * self.page_size : self.page_size] // self.page_size
        attended = torch.zeros(len(lengths), dtype=torch.float32, device=seq_lens.device)
        if all_dense:
            attended += seq_lens.float() * self.num_sparse_layers
        return DecodeMetadata(
            block_table=block_table.to(torch.int32),
            seq_lens=seq_lens,
            budgets=torch.tensor(budgets, dtype=torch.long, device=seq_lens.device),
            all_dense=all_dense,
            attended=attended,
        )

    # -- forward ----------------------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        out = self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if save_kv_cache and k is not None:
            self._update_summaries(layer, forward_batch.out_cache_loc, k)
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        md = self.forward_metadata
        if isinstance(md, GraphStep):
            return self._forward_decode_graph(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if self.cfg.is_dense_layer(layer.layer_id) or md.all_dense:
            out = self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
            if save_kv_cache and k is not None:
                self._update_summaries(layer, forward_batch.out_cache_loc, k)
            return out
        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)
            self._update_summaries(layer, forward_batch.out_cache_loc, k)
        heads, kv_heads, head_dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        paged = (-1, self.page_size, kv_heads, head_dim)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id).view(paged)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id).view(paged)
        out, selection = sparse_decode(
            q.reshape(-1, heads, head_dim),
            k_cache,
            v_cache,
            md.block_table,
            md.seq_lens,
            md.budgets,
            self.cfg,
            layer=layer.layer_id,
            summaries=self._summaries(layer),
            scale=layer.scaling,
            return_selection=True,
        )
        md.attended += selection.attended_tokens(md.seq_lens, self.page_size).float().mean(-1)
        return out.reshape(-1, heads * layer.v_head_dim)

    def _summaries(self, layer) -> PageSummaries:
        return self._summaries_of(layer.layer_id, layer.tp_k_head_num, layer.qk_head_dim)

    def _summaries_of(self, layer_id: int, kv_heads: int, head_dim: int) -> PageSummaries:
        summaries = self.summaries.get(layer_id)
        if summaries is None:
            slots = self.token_to_kv_pool.get_key_buffer(layer_id).shape[0]
            if slots % self.page_size:
                raise ConfigError(f"KV buffer of {slots} slots is not a whole number of {self.page_size}-token pages")
            summaries = PageSummaries.allocate(slots // self.page_size, kv_heads, head_dim, device=self.device)
            self.summaries[layer_id] = summaries
        return summaries

    def _update_summaries(self, layer, cache_loc: torch.Tensor, k: torch.Tensor) -> None:
        if self.cfg.is_dense_layer(layer.layer_id) or cache_loc is None or cache_loc.numel() == 0:
            return
        loc = cache_loc.long()
        keys = k.reshape(loc.shape[0], layer.tp_k_head_num, layer.qk_head_dim)
        self._summaries(layer).append(loc // self.page_size, loc % self.page_size, keys)

    # -- CUDA graphs (see graph_state.py for SGLang's call sequence) ----------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        if self.inner_has_graphs:
            self.inner.init_cuda_graph_state(max_bs, max_num_tokens)
        sparse = [i for i in range(self.num_layers) if not self.cfg.is_dense_layer(i)]
        kv_heads = self.token_to_kv_pool.get_key_buffer(sparse[0]).shape[1] if sparse else 1
        for layer_id in sparse:  # allocate now: nothing may be allocated for them while a graph is captured
            buffer = self.token_to_kv_pool.get_key_buffer(layer_id)
            self._summaries_of(layer_id, buffer.shape[1], buffer.shape[2])
        self.graph = GraphDecodeState(self.req_to_token, self.cfg, server_schedule(), max_bs, kv_heads,
                                      self.num_sparse_layers)
        REGISTRY.slot_reader = self.graph.read

    def get_cuda_graph_seq_len_fill_value(self):
        try:
            return self.inner.get_cuda_graph_seq_len_fill_value()
        except NotImplementedError:
            return 1

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Host prep of a captured (in_capture) or replayed batch; `forward_batch` may be SGLang's replay view."""
        if self.inner_has_graphs:
            self.inner.init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
        else:
            self.inner.init_forward_metadata(forward_batch)
        self.forward_metadata = None
        if not forward_batch.forward_mode.is_decode():
            return
        if self.graph is None:
            raise ConfigError("init_cuda_graph_state must run before a graph batch is prepared")
        bs = forward_batch.batch_size
        self.graph.set_live(0 if in_capture else bs - (getattr(forward_batch, "num_padding", 0) or 0))
        self.forward_metadata = GraphStep(bs)

    def init_forward_metadata_in_graph(self, forward_batch):
        if self.inner_has_graphs:
            self.inner.init_forward_metadata_in_graph(forward_batch)
        if forward_batch.forward_mode.is_decode():
            self.graph.prepare(forward_batch)

    def _bind_slots(self, forward_batch) -> None:
        rids = forward_batch.rids or []
        if not rids:
            return
        host = getattr(forward_batch, "req_pool_indices_cpu", None)
        slots = (host if host is not None else forward_batch.req_pool_indices)[: len(rids)].tolist()  # once per extend
        fresh = [REGISTRY.bind_slot(rid, slot) for rid, slot in zip(rids, slots)]  # folds old counts before reset
        self.graph.bind([REGISTRY.get(rid).schedule for rid in rids], slots, fresh)

    def _forward_decode_graph(self, q, k, v, layer, forward_batch, save_kv_cache, **kwargs):
        if self.cfg.is_dense_layer(layer.layer_id):
            return self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        heads, kv_heads, head_dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        summaries = self._summaries(layer)
        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)
            keys = k.reshape(-1, kv_heads, head_dim)
            self.graph.append_summaries(summaries, forward_batch.out_cache_loc, keys)
        paged = (-1, self.page_size, kv_heads, head_dim)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id).view(paged)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id).view(paged)
        out = self.graph.attend(q.reshape(-1, heads, head_dim), k_cache, v_cache, summaries, layer.scaling)
        return out.reshape(-1, heads * layer.v_head_dim)

    def support_triton(self):
        return self.inner.support_triton()


def _prefill_graphs_on() -> bool:
    """Whether SGLang's published graph config captures prefill (False before it is published, e.g. in tests)."""
    from sglang.srt.model_executor.cuda_graph_config import Backend
    from sglang.srt.runtime_context import get_exec

    try:
        config = get_exec().graph.cuda_graph_config
    except (AttributeError, ValueError):
        return False
    return config is not None and config.prefill.backend != Backend.DISABLED
