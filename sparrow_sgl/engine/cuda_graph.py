"""Sync-free GPU decode for the engine, captured in CUDA graphs per padded batch size and replayed every step.

A step reads only static device buffers: the host copies the tokens and positions (one small copy) and, when the
batch changes, the block tables. Inside the captured forward the device derives sequence lengths, KV slots and each
request's page budget from a device table of the schedule's per-bin budgets, so budgets are data: one graph serves
every schedule with the same page-list width. Each attention layer then runs, all in the same graph:
  1. `qkv_append_decode` on the qkv projection: q/k RMSNorm + rotary, the new token's K/V into the paged cache and
     its page summary, one Triton launch (`SPARROW_FUSED_APPEND=0`: `qk_norm_rope` then `append_kv_decode`, the
     same bits in two launches);
  2. dense layers (and dense schedules): the Triton decode over every page, or FlashInfer's paged decode;
  3. sparse layers: Triton page selection, a scoring launch then a top-k launch (writing FlashInfer's per-KV-head
     page lists when FlashInfer attends), then block-sparse decode over the selected pages.
     `SPARROW_SELECT_LAUNCHES=1` fuses scoring and top-k into one launch instead; it measured 4-9% slower end to
     end on an H100 (bench/results/NOTES.md, phase 4), so two launches stay the default.
Triton (the default) needs no planning; FlashInfer (SPARROW_ATTN_BACKEND=flashinfer) is planned on the host before
each replay from host-known page counts (no device sync). Graphs are captured
lazily per `StepKey`; a step that cannot be captured runs the same code eagerly. `SPARROW_GPU_DECODE` = graph
(default) | eager (same step, no capture) | off (the per-layer `sparse_decode` reference path).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from sparrow_sgl.attention.kernels import dispatch
from sparrow_sgl.config import Schedule, SparsityConfig
from sparrow_sgl.engine import fused
from sparrow_sgl.engine.context import Context, reset_context, set_context

MODE_ENV = "SPARROW_GPU_DECODE"
MODES = ("graph", "eager", "off")
REMOVED_CENTROID_ENV = "SPARROW_BF16_CENTROIDS"  # replaced by the "centroid-bf16" scorer (session 14)
SELECT_ENV = "SPARROW_SELECT_LAUNCHES"
APPEND_ENV = "SPARROW_FUSED_APPEND"
GRAPH_BATCHES_ENV = "SPARROW_GRAPH_BATCHES"
WIDTH_ENV = "SPARROW_TABLE_WIDTH"  # "reached" (default) or "allocated": what sizes a step's block table (step_width)
# Powers of two. Finer sizes (steps of 8, as vLLM's and SGLang's lists) measured 4-5% slower sparse rollouts on an
# H200 for 1.7B (34 -> 40 rows) and 8B (24 rows): the decode split plan (triton_decode.plan_splits) then puts just
# over 8 programs per SM and a tail wave runs alone; idle padding rows exit at once (bench/results/NOTES.md, session 7).
# Since session 17 the plan counts live rows and resident waves, so the padding no longer sets it; finer sizes
# (less work in the other per-row kernels) are unmeasured since (e.g. SPARROW_GRAPH_BATCHES=1:2:4:8:16:24:32:40:48:64).
PADDED_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_BINS = 256  # budget bins a graph's device table holds (the last bin repeats past a schedule's end)
MIN_WIDTH = 16  # smallest block-table width (pages) of a captured step


def decode_mode() -> str:
    mode = os.environ.get(MODE_ENV, "").strip().lower() or "graph"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: choose one of {MODES}")
    return mode


def select_launches() -> int:
    value = os.environ.get(SELECT_ENV, "").strip() or "2"
    if value not in ("1", "2"):
        raise ValueError(f"{SELECT_ENV}={value!r}: choose 1 (fused score + top-k) or 2 (two launches)")
    return int(value)


def fused_append() -> bool:
    """q/k norm + rotary fused with the KV append (one launch per layer) unless SPARROW_FUSED_APPEND=0; read while
    a step is captured, like fused.py's switch."""
    return os.environ.get(APPEND_ENV, "1").strip() != "0"


def graph_batches() -> tuple[int, ...]:
    """Batch sizes decode graphs are captured for: `SPARROW_GRAPH_BATCHES` (increasing sizes separated by commas or
    colons, e.g. 1:2:4:8:16:32:64:128:256) or PADDED_BATCHES."""
    text = os.environ.get(GRAPH_BATCHES_ENV, "").strip()
    if not text:
        return PADDED_BATCHES
    parts = [p.strip() for p in text.replace(":", ",").split(",")]
    sizes = [int(p) for p in parts if p.isdigit()]
    if len(sizes) != len(parts) or not sizes or sizes[0] < 1 or sizes != sorted(set(sizes)):
        raise ValueError(f"{GRAPH_BATCHES_ENV}={text!r}: expected increasing positive batch sizes, e.g. 1,2,4,8,16")
    return tuple(sizes)


def padded_batch(n: int) -> int:
    """The captured batch size that holds n requests (n itself past the largest)."""
    return next((size for size in graph_batches() if n <= size), n)


def table_width(max_pages: int) -> int:
    """Block-table columns of a step: the longest request's pages rounded up to a power of two."""
    return max(MIN_WIDTH, 1 << max(max_pages - 1, 0).bit_length())


def step_width(block_tables, positions, page_size: int) -> int:
    """Block-table columns of a step: the pages its longest request has reached so far, not the pages allocated up
    front for the whole response, rounded up to a power of two (`table_width`). Scoring, top-k and the attention
    splits are sized by the width, so a rollout allocated 32K tokens runs its first 2K tokens at 128 columns, not
    2048 (a step per width is captured: at most log2 of the longest table). `SPARROW_TABLE_WIDTH=allocated` sizes it
    by the allocated pages instead, as before session 15."""
    allocated = max(len(row) for row in block_tables)
    mode = os.environ.get(WIDTH_ENV, "").strip() or "reached"
    if mode not in ("reached", "allocated"):
        raise ValueError(f"{WIDTH_ENV}={mode!r}: choose 'reached' (pages the requests reached) or 'allocated'")
    if mode == "allocated":
        return table_width(allocated)
    return table_width(min(allocated, max(int(p) for p in positions) // page_size + 1))


def budget_table(schedule: Schedule, width: int) -> tuple[np.ndarray, int]:
    """(pages per bin [MAX_BINS] int32 with dense bins = width and the last bin repeated, page-list width K)."""
    if len(schedule.budgets) > MAX_BINS:
        raise ValueError(f"schedule has {len(schedule.budgets)} bins; the graph table holds {MAX_BINS}")
    pages = [width if b is None else min(b // schedule.page_size, width) for b in schedule.budgets]
    table = np.full(MAX_BINS, pages[-1], dtype=np.int32)
    table[: len(pages)] = pages
    k_cols = min(width, max(16, 1 << (max(pages) - 1).bit_length()))
    return table, k_cols


def host_budget_pages(table: np.ndarray, bin_tokens: int, seq_lens: np.ndarray) -> np.ndarray:
    """What the graph computes on the device: the page budget of each request from its KV length."""
    return table[np.minimum(seq_lens // bin_tokens, MAX_BINS - 1)]


def default_backend(dtype: torch.dtype, head_dim: int) -> str:
    """Triton unless SPARROW_ATTN_BACKEND=flashinfer, for dense and sparse layers alike: inside the graph both ran
    within a few percent on an H100, while on an H200 FlashInfer read the 2 dense layers' KV of a sparse step at
    ~0.6 of the bytes floor and Triton at ~0.96 (4B/8B: the sparse step 4-8% slower with FlashInfer there), and
    Triton needs no per-step host planning (bench/results/NOTES.md, end-to-end decode and phase 5). With
    FlashInfer's tensor-core decode for group 4 (the default since session 8) its dense layers are level with
    Triton and its sparse layers still 3-4% slower (sparse rollouts, 4B/8B, session 8 call 15)."""
    forced = os.environ.get(dispatch.ENV_VAR, "").strip().lower()
    fi_ok = dispatch.installed("flashinfer") and dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128, 256)
    if forced == "flashinfer" and not fi_ok:
        raise ValueError(f"{dispatch.ENV_VAR}=flashinfer cannot serve a {dtype} cache with head_dim {head_dim}")
    return "flashinfer" if forced == "flashinfer" else "triton"


@dataclass(frozen=True, slots=True)
class StepKey:
    """What a captured graph fixes: batch, block-table width, dense or sparse, page-list width, selection settings,
    and whether the step samples too (sample_topk >= 0: the top-k log-probs it returns; -1: logits only)."""

    batch: int
    width: int
    sparse: bool
    k_cols: int
    sparsity: tuple
    sample_topk: int = -1
    splits: tuple[int, int] = (0, 0)  # Triton decode programs per row: dense launches, sparse launches (0: none)

    @staticmethod
    def of(n: int, width: int, k_cols: int | None, cfg: SparsityConfig, sample_topk: int = -1,
           splits: tuple[int, int] = (0, 0)) -> StepKey:
        settings = (cfg.page_size, cfg.sink_pages, cfg.local_pages, cfg.scorer, tuple(cfg.dense_layers))
        return StepKey(padded_batch(n), width, k_cols is not None, k_cols or 0, settings, sample_topk, splits)


def decode_splits(n: int, kv_heads: int, width: int, k_cols: int | None, page_size: int, sms: int) -> tuple[int, int]:
    """The Triton decode's programs per row for a step of n live requests: (dense launches over `width` pages,
    sparse launches over `k_cols`; 0 without sparse layers). The plan counts the live rows, since a padded batch's
    padding rows exit at once (`triton_decode.plan_splits`; `SPARROW_DECODE_WAVES`: the earlier rule, every row), so
    a graph is captured per plan: a batch that shrinks within its padded size gets the plan of its live rows."""
    from sparrow_sgl.attention.kernels.triton_decode import decode_tiling, plan_splits

    waves, block_p = decode_tiling(page_size)
    rows = (padded_batch(n) if waves is not None else max(n, 1)) * kv_heads
    dense = plan_splits(rows, width, block_p, sms, waves)[0]
    return dense, plan_splits(rows, k_cols, block_p, sms, waves)[0] if k_cols else 0


class DecodeStep:
    """Static buffers of one `StepKey` and the forward that is captured; attention layers call `attend`."""

    def __init__(self, runner: GraphDecodeRunner, key: StepKey, cfg: SparsityConfig) -> None:
        from sparrow_sgl.attention.kernels.flashinfer_decode import FlashInferDenseDecoder, FlashInferSparseDecoder

        self.runner, self.key, self.cfg = runner, key, cfg
        dev, bs, width = runner.device, key.batch, key.width
        self.inputs = torch.zeros(2 * bs + 1, dtype=torch.long, device=dev)  # tokens | positions | live rows
        self.block_table = torch.zeros(bs, width, dtype=torch.int32, device=dev)
        self.rows = torch.arange(bs, device=dev)
        self.cols = torch.arange(width, device=dev)
        self.logits = runner.logits_buffer(bs)
        self.attended = torch.zeros(bs, dtype=torch.float32, device=dev)
        if key.sample_topk >= 0:  # per row: 1 / temperature, uniform, greedy flag | token, log-prob, attended, top-k
            self.sample_in = torch.ones(3, bs, dtype=torch.float32, device=dev)
            self.sample_out = torch.zeros(bs, 3 + 2 * key.sample_topk, dtype=torch.float64, device=dev)
        self.append_tickets = torch.zeros(bs, dtype=torch.int32, device=dev)  # qkv_append_decode leaves them zero
        self.dense_pages = self.cols.to(torch.int32)[None, None, :].expand(bs, 1, width)
        if key.sparse:
            self.pages = torch.zeros(bs, runner.kv_heads, key.k_cols, dtype=torch.int32, device=dev)
            self.scores = torch.zeros(bs, runner.kv_heads, width, dtype=torch.float32, device=dev)
            self.counters = torch.zeros(bs * runner.kv_heads, dtype=torch.int32, device=dev)  # per-row tickets
        self.fi_dense = self.fi_sparse = None
        group = runner.q_heads // runner.kv_heads
        if runner.dense_backend == "flashinfer":
            self.fi_dense = FlashInferDenseDecoder("HND", group, dev, use_cuda_graph=True, batch=bs,
                                                   max_pages=bs * width + 1, workspace=runner.workspace())
        if key.sparse and runner.sparse_backend == "flashinfer":
            self.fi_sparse = FlashInferSparseDecoder(bs, runner.kv_heads, runner.q_heads, runner.head_dim,
                                                     cfg.page_size, key.k_cols, runner.dtype, dev,
                                                     use_cuda_graph=True, workspace=runner.workspace())
        self.table_key: object = None
        self.n_live = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False
        self._staging: list[dict] | None = None  # two sets of pinned host buffers, alternating launch by launch
        self._launches = 0

    # -- host side, before each run -------------------------------------------------------------------------------
    def load(self, token_ids, positions, block_tables, table_key=None, sample_rows=None) -> None:
        """Copy the step's inputs; block tables only when `table_key` changes (None: always); sample_rows: the
        sampler's [3][n] per-row inputs of a sampling step (padding rows take the argmax)."""
        n, bs, width = len(token_ids), self.key.batch, self.key.width
        if self.key.sample_topk >= 0:
            rows = np.ones((3, bs), dtype=np.float32)
            rows[:, :n] = sample_rows
            self.sample_in.copy_(torch.from_numpy(rows))
        host = np.zeros(2 * bs + 1, dtype=np.int64)
        host[:n], host[bs : bs + n], host[2 * bs] = token_ids, positions, n
        self.inputs.copy_(torch.from_numpy(host))
        self.n_live = n
        if table_key is None or table_key != self.table_key:
            table = np.zeros((bs, width), dtype=np.int32)
            for i, row in enumerate(block_tables):
                row = row[:width]  # the pages past the step's width are not reached yet
                table[i, : len(row)] = row
            self.block_table.copy_(torch.from_numpy(table))
            self.table_key = table_key

    @property
    def chainable(self) -> bool:
        """The next step can be loaded while this one runs: nothing is planned on the host (no FlashInfer)."""
        return self.key.sample_topk >= 0 and self.fi_dense is None and self.fi_sparse is None

    def _pinned(self) -> dict:
        """This launch's pinned host buffers. Two sets alternate: the set a launch writes was last used two launches
        ago, and the engine reads (waits for) every launch before it starts the one after the next."""
        if self._staging is None:
            bs, cols = self.key.batch, self.sample_out.shape[1]
            with torch.inference_mode(False):  # plain tensors, writable outside inference mode too
                self._staging = [dict(inputs=torch.zeros(2 * bs + 1, dtype=torch.long, pin_memory=True),
                                      sample=torch.ones(3, bs, dtype=torch.float32, pin_memory=True),
                                      out=torch.zeros(bs, cols, dtype=torch.float64, pin_memory=True),
                                      event=torch.cuda.Event()) for _ in range(2)]
        return self._staging[self._launches % 2]

    def load_next(self, positions, sample_rows) -> None:
        """Inputs of the next step of the same requests, before the host has read this step's tokens: positions
        and sampler rows copied from pinned memory without a sync, the tokens from this step's sampled column."""
        n, bs, buf = len(positions), self.key.batch, self._pinned()
        host = buf["inputs"].numpy()
        host[:] = 0
        host[bs : bs + n], host[2 * bs] = positions, n
        rows = buf["sample"].numpy()
        rows[:] = 1.0
        rows[:, :n] = sample_rows
        self.inputs.copy_(buf["inputs"], non_blocking=True)
        self.inputs[:n].copy_(self.sample_out[:n, 0])  # stream order: after this step, before the next replay
        self.sample_in.copy_(buf["sample"], non_blocking=True)
        self.n_live = n

    def read_back(self, n: int) -> PendingSample:
        """Queue the copy of this replay's packed samples to pinned memory; the host reads them when it needs to."""
        buf = self._pinned()
        self._launches += 1
        out = buf["out"][:n]
        out.copy_(self.sample_out[:n], non_blocking=True)
        buf["event"].record()
        return PendingSample(self, out, buf["event"])

    def plan(self, positions) -> None:
        """Plan FlashInfer from host page counts (no device sync); nothing to do for the Triton kernels."""
        if self.fi_dense is None and self.fi_sparse is None:
            return
        runner, page, bs = self.runner, self.cfg.page_size, self.key.batch
        seq = np.ones(bs, dtype=np.int64)
        seq[: len(positions)] = np.asarray(positions, dtype=np.int64) + 1
        n_pages = (seq + page - 1) // page
        last_len = seq - (n_pages - 1) * page
        if self.fi_dense is not None:
            self.fi_dense.plan_host(n_pages, last_len, runner.q_heads, runner.kv_heads, runner.head_dim, page,
                                    runner.dtype, runner.scale)
        if self.fi_sparse is not None:
            counts = np.minimum(host_budget_pages(runner.host_table, runner.host_bin_tokens, seq), n_pages)
            kv = runner.kv_heads  # the last page is always selected (local pages), so rows end with its fill
            self.fi_sparse.plan_host(np.repeat(counts, kv), np.repeat(last_len, kv), runner.scale)

    # -- device side: what the graph captures ---------------------------------------------------------------------
    def forward(self) -> None:
        runner, cfg, bs, page = self.runner, self.cfg, self.key.batch, self.cfg.page_size
        tokens, positions = self.inputs[:bs], self.inputs[bs : 2 * bs]
        live = self.rows < self.inputs[2 * bs]
        self.seq_lens = (positions + 1).to(torch.int32)
        slot = self.block_table.gather(1, (positions // page)[:, None])[:, 0]
        self.slot_pages = torch.where(live, slot, torch.full_like(slot, -1))  # padding rows write nothing
        self.slot_offsets = (positions % page).to(torch.int32)
        n_pages = (self.seq_lens + page - 1) // page
        self.dense_counts = n_pages[:, None]
        attended = self.seq_lens
        if self.key.sparse:
            bins = torch.div(self.seq_lens, runner.bin_tokens, rounding_mode="floor").clamp(max=MAX_BINS - 1)
            self.budget_pages = runner.bin_table[bins.long()]
            k = torch.minimum(self.budget_pages, n_pages)
            self.sparse_counts = k[:, None].expand(bs, runner.kv_heads)
            # sink and local pages are always kept, so a request's last (partial) page is always among its k
            attended = torch.where(k >= n_pages, self.seq_lens, (k - 1) * page + self.seq_lens - (n_pages - 1) * page)
        self.attended.copy_(attended)
        if self.fi_dense is not None:
            self._fill_dense_page_list(n_pages)
        set_context(Context(is_prefill=False, sparsity=cfg, gpu=self))
        try:
            hidden = runner.model(tokens, positions)
            self.logits.copy_(runner.model.compute_logits(hidden))
        finally:
            reset_context()
        if self.key.sample_topk >= 0:
            self._sample()

    def _sample(self) -> None:
        """The fused sampler on the step's logits (engine/sampler.py's `_fused`), the attended KV tokens beside its
        token and log-prob, packed for one device-to-host copy."""
        from sparrow_sgl.attention.kernels.triton_sample import sample_packed

        inv_t, uniform, greedy = self.sample_in
        sample_packed(self.logits, inv_t, uniform, greedy, self.key.sample_topk, extra=(self.attended,),
                      out=self.sample_out)

    def _fill_dense_page_list(self, n_pages: torch.Tensor) -> None:
        """FlashInfer's dense page list from the block table, at the row starts plan() wrote (extras to a dump slot)."""
        indptr = self.fi_dense.buffers["paged_kv_indptr_buffer"][:-1].long()
        indices = self.fi_dense.buffers["paged_kv_indices_buffer"]
        target = indptr[:, None] + self.cols[None, :]
        dump = torch.full_like(target, indices.numel() - 1)
        target = torch.where(self.cols[None, :] < n_pages[:, None], target, dump)
        indices.scatter_(0, target.flatten(), self.block_table.flatten())

    def attend_qkv(self, layer, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One layer's decode attention on its qkv projection (called by `PagedAttention.forward_qkv`): q/k norm +
        rotary, KV append and summaries in one launch, then `attend`'s attention. Where `qk_norm_rope` would not
        run its Triton kernel (or SPARROW_FUSED_APPEND=0) the two ops run apart, as before."""
        if not (fused_append() and fused.use_fused_qk(qkv, q_weight)):
            q, k, v = fused.qk_norm_rope(qkv, q_weight, k_weight, eps, cos, sin, layer.num_heads, layer.num_kv_heads)
            return self.attend(layer, q, k, v)
        from sparrow_sgl.attention.kernels.triton_qkv_append import qkv_append_decode

        centroid = self._centroid(layer)
        q = qkv_append_decode(qkv, q_weight, k_weight, eps, cos, sin, layer.num_heads, layer.k_cache, layer.v_cache,
                              layer.summaries, self.slot_pages, self.slot_offsets, minmax=self.cfg.scorer == "quest",
                              centroid=centroid, tickets=self.append_tickets)
        return self._attend_cached(layer, q, centroid)

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One layer's decode attention (called by `PagedAttention.forward` while this step is the context)."""
        from sparrow_sgl.attention.kernels.triton_summaries import append_kv_decode

        centroid = self._centroid(layer)
        append_kv_decode(layer.k_cache, layer.v_cache, layer.summaries, self.slot_pages, self.slot_offsets, k, v,
                         minmax=self.cfg.scorer == "quest", centroid=centroid)
        return self._attend_cached(layer, q, centroid)

    def _centroid(self, layer) -> torch.Tensor | None:
        return self.runner.centroids[layer.layer_idx] if self.runner.centroids else None

    def _attend_cached(self, layer, q: torch.Tensor, centroid: torch.Tensor | None) -> torch.Tensor:
        """Attention of q over the layer's cache, the step's token already appended: dense or select + sparse."""
        from sparrow_sgl.attention.kernels.triton_decode import triton_attend_pages
        from sparrow_sgl.attention.kernels.triton_score_heads import use_all_heads
        from sparrow_sgl.attention.kernels.triton_select import select_pages_into

        cfg, summaries = self.cfg, layer.summaries
        if not self.key.sparse or cfg.is_dense_layer(layer.layer_idx):
            if self.fi_dense is not None:
                return self.fi_dense.run(q, layer.k_cache, layer.v_cache)
            return triton_attend_pages(q, layer.k_cache, layer.v_cache, self.block_table, self.seq_lens,
                                       self.dense_pages, self.dense_counts, cfg, layer.scale,
                                       splits=self.key.splits[0] or None)
        use_centroid = centroid is not None and cfg.bf16_centroids
        select_pages_into(
            q, self.block_table, self.seq_lens, self.budget_pages, cfg, self.pages,
            key_sum=centroid if use_centroid else summaries.key_sum, count=None if use_centroid else summaries.count,
            key_min=summaries.key_min, key_max=summaries.key_max, scores=self.scores, counters=self.counters,
            csr=self.fi_sparse.csr if self.fi_sparse is not None else None, one_launch=self.runner.one_launch_select,
            all_heads=use_all_heads(),
        )
        if self.fi_sparse is not None:
            return self.fi_sparse.run(q, layer.k_cache, layer.v_cache)
        return triton_attend_pages(q, layer.k_cache, layer.v_cache, self.block_table, self.seq_lens, self.pages,
                                   self.sparse_counts, cfg, layer.scale, splits=self.key.splits[1] or None)


@dataclass
class PendingSample:
    """A sampling decode step launched on the GPU: its packed rows land in pinned memory when `event` fires."""

    step: DecodeStep
    host: torch.Tensor
    event: torch.cuda.Event

    @property
    def chainable(self) -> bool:
        return self.step.chainable

    def rows(self) -> list[list[float]]:
        """Per request [token, log-prob, attended KV tokens, topk ids..., topk log-probs...]; waits for this step."""
        self.event.synchronize()
        return self.host.tolist()


class GraphDecodeRunner:
    """Decode steps of one model on CUDA: `decode(...)` loads a step's buffers, plans, and replays its graph."""

    def __init__(
        self,
        model,
        device: torch.device | str,
        *,
        use_graphs: bool = True,
        dense_backend: str | None = None,
        sparse_backend: str | None = None,
        bf16_centroids: bool = False,
        one_launch_select: bool | None = None,
    ) -> None:
        layers = model.attention_layers
        first = layers[0]
        self.model, self.device = model, torch.device(device)
        self.q_heads, self.kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.scale, self.dtype = first.scale, first.k_cache.dtype
        self.vocab_size = model.lm_head.weight.shape[0]
        self.use_graphs = use_graphs
        self.one_launch_select = select_launches() == 1 if one_launch_select is None else one_launch_select
        self.dense_backend = dense_backend or default_backend(self.dtype, self.head_dim)
        self.sparse_backend = sparse_backend or default_backend(self.dtype, self.head_dim)
        self.bin_table = torch.zeros(MAX_BINS, dtype=torch.int32, device=self.device)
        self.bin_tokens = torch.ones(1, dtype=torch.int32, device=self.device)
        self.host_table, self.host_bin_tokens = np.zeros(MAX_BINS, dtype=np.int32), 1
        self.centroids: list[torch.Tensor] | None = None
        self.steps: dict[StepKey, DecodeStep] = {}
        if bf16_centroids:
            self.keep_bf16_centroids()
        self.last_step: DecodeStep | None = None
        self._pool = None
        self._workspace: torch.Tensor | None = None
        self._logits: dict[int, torch.Tensor] = {}
        self.captures, self.capture_s = 0, 0.0  # graphs captured by this runner, and the seconds that took

    def logits_buffer(self, batch: int) -> torch.Tensor:
        """The float32 [batch, vocab] logits every step of this padded batch writes: steps run one at a time on one
        stream (each sampling step reads them in its own graph), so the steps of the block-table widths a rollout
        passes through share one buffer instead of one each (~40 MB at 64 rows of a 152K vocabulary)."""
        if batch not in self._logits:
            self._logits[batch] = torch.zeros(batch, self.vocab_size, dtype=torch.float32, device=self.device)
        return self._logits[batch]

    def workspace(self) -> torch.Tensor:
        from sparrow_sgl.attention.kernels.flashinfer_decode import WORKSPACE_BYTES

        if self._workspace is None:
            self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        return self._workspace

    @torch.inference_mode()
    def keep_bf16_centroids(self) -> None:
        """Keep a bf16 copy of every page centroid for the "centroid-bf16" scorer (half the bytes of the float32
        sums), written by the KV-append kernels from then on. Steps captured before it existed do not update it, so
        they are dropped and captured again."""
        if self.centroids is not None:
            return
        self.centroids = [torch.zeros_like(a.summaries.key_sum, dtype=torch.bfloat16)
                          for a in self.model.attention_layers]
        self.refresh_centroids()
        self.steps.clear()
        self.last_step = None

    @torch.inference_mode()
    def refresh_centroids(self, pages: torch.Tensor | None = None) -> None:
        """Recompute the bf16 centroid copy of `pages` (all when None) from the float32 sums (after a prefill)."""
        if not self.centroids:
            return
        for attn, centroid in zip(self.model.attention_layers, self.centroids):
            s = attn.summaries
            if pages is None:
                centroid.copy_(s.centroid())
            else:
                p = pages.to(device=centroid.device, dtype=torch.long)
                centroid[p] = s.centroid(p).to(centroid.dtype)

    @torch.inference_mode()
    def decode(self, token_ids, positions, block_tables, schedule: Schedule, sparsity: SparsityConfig,
               table_key=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [n, V] float32 and attended KV tokens [n] (device views, valid until the next call).

        token_ids / positions (= tokens already cached) / block_tables: host data of the n requests.
        """
        step = self._step(token_ids, positions, block_tables, schedule, sparsity, table_key)
        n = len(token_ids)
        return step.logits[:n], step.attended[:n]

    @torch.inference_mode()
    def launch_sample(self, token_ids, positions, block_tables, schedule: Schedule, sparsity: SparsityConfig,
                      sample_rows, topk: int, table_key=None, after: PendingSample | None = None) -> PendingSample:
        """`decode`, then the fused sampler inside the same graph, launched: the returned PendingSample's rows are,
        per request, [token, log-prob, attended KV tokens, topk ids..., topk log-probs...] (one device-to-host copy,
        read when needed). sample_rows: the sampler's [3][n] per-row inputs (1 / temperature, uniform, greedy flag:
        engine/sampler.py). after: the launched, unread step of the same requests whose sampled tokens this step
        feeds (token_ids is then ignored and the positions are one past that step's); where that step cannot be
        chained its tokens are read first."""
        if (after is not None and after.chainable and len(positions) == after.step.n_live
                and step_width(block_tables, positions, sparsity.page_size) == after.step.key.width):
            step = after.step
            step.load_next(positions, sample_rows)
            self._run(step)
        else:
            if after is not None:
                token_ids = [int(row[0]) for row in after.rows()]
            step = self._step(token_ids, positions, block_tables, schedule, sparsity, table_key, sample_rows, topk)
        self.last_step = step
        return step.read_back(len(positions))

    def _step(self, token_ids, positions, block_tables, schedule, sparsity, table_key, sample_rows=None,
              topk: int = -1) -> DecodeStep:
        n = len(token_ids)
        width = step_width(block_tables, positions, sparsity.page_size)
        k_cols = None
        if not schedule.is_dense:
            table, k_cols = budget_table(schedule, width)
            self._load_schedule(table, schedule.bin_tokens)
        if sparsity.bf16_centroids and not schedule.is_dense:
            self.keep_bf16_centroids()
        key = StepKey.of(n, width, k_cols, sparsity, topk, splits=self._decode_splits(n, width, k_cols, sparsity))
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = DecodeStep(self, key, sparsity)
        step.load(token_ids, positions, block_tables, table_key, sample_rows)
        step.plan(positions)
        self._run(step)
        self.last_step = step
        return step

    def _decode_splits(self, n: int, width: int, k_cols: int | None, cfg: SparsityConfig) -> tuple[int, int]:
        """`decode_splits` of the launches that run the Triton decode (0 where FlashInfer attends)."""
        from sparrow_sgl.attention.kernels.triton_decode import num_sms

        dense, sparse = decode_splits(n, self.kv_heads, width, k_cols, cfg.page_size, num_sms(self.device))
        return (dense if self.dense_backend == "triton" else 0), (sparse if self.sparse_backend == "triton" else 0)

    def _load_schedule(self, table: np.ndarray, bin_tokens: int) -> None:
        if bin_tokens != self.host_bin_tokens or not np.array_equal(table, self.host_table):
            self.bin_table.copy_(torch.from_numpy(table))
            self.bin_tokens.fill_(bin_tokens)
            self.host_table, self.host_bin_tokens = table, bin_tokens

    def _run(self, step: DecodeStep) -> None:
        if not self.use_graphs or step.eager:
            step.forward()
            return
        if step.graph is None:
            start = time.perf_counter()
            try:
                step.graph = self._capture(step)
                torch.cuda.synchronize(self.device)
                self.captures += 1
                self.capture_s += time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to the same step, eagerly
                print(f"sparrow engine: CUDA graph capture failed for {step.key} ({e}); running eagerly",
                      file=sys.stderr)
                step.eager = True
                step.inputs[2 * step.key.batch].fill_(step.n_live)
                torch.cuda.synchronize(self.device)
                step.forward()
                return
        step.graph.replay()

    def _capture(self, step: DecodeStep) -> torch.cuda.CUDAGraph:
        """Warm up (compiles the kernels) and capture with every row marked padding, so nothing is written twice."""
        live = step.inputs[2 * step.key.batch]
        live.fill_(0)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step.forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            step.forward()
        self._pool = graph.pool()
        live.fill_(step.n_live)
        return graph


def make_gpu_decoder(model, device: torch.device) -> GraphDecodeRunner | None:
    """The engine's GPU decode runner, or None where it does not apply (CPU, `off`, no Triton, odd head_dim)."""
    if os.environ.get(REMOVED_CENTROID_ENV, "").strip() not in ("", "0"):
        raise ValueError(f"{REMOVED_CENTROID_ENV} is gone: give the schedule (or EngineConfig) scorer='centroid-bf16' "
                         "instead, which the torch reference, calibration and SGLang honour too")
    if device.type != "cuda" or decode_mode() == "off" or not dispatch.installed("triton"):
        return None
    if os.environ.get(dispatch.ENV_VAR, "").strip().lower() == "torch":
        return None
    head_dim = model.attention_layers[0].head_dim
    if head_dim & (head_dim - 1) or head_dim < 16:
        return None
    return GraphDecodeRunner(model, device, use_graphs=decode_mode() == "graph")
