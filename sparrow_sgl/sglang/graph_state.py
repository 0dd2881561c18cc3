"""Static decode metadata of the `sparrow` backend for SGLang's CUDA-graph decode (SGLang 0.5.23 hook contract).

SGLang's `DecodeCudaGraphRunner` drives a backend through three hooks (the older `*_capture_cuda_graph` /
`*_replay_cuda_graph` pair is gone from this release):
- `init_cuda_graph_state(max_bs, max_num_tokens)` once, before capturing;
- capture, per batch size bs: `init_forward_metadata_out_graph(fb, in_capture=True)` on the host, then
  `init_forward_metadata_in_graph(fb)` + the model forward, run once as warm-up and once under `torch.cuda.graph`;
  `fb` holds static buffers that stay the graph's inputs;
- replay: those buffers are refilled (padded rows: req_pool_index 0, seq_len = the fill value, out_cache_loc 0),
  `init_forward_metadata_out_graph(view)` runs on the host with a view that carries no request ids, and the graph
  replays: the in-graph prep and every layer's `forward_decode` run as recorded. `init_forward_metadata` is never
  called for a replayed batch.

So per-request schedules reach a replayed batch through the device: each req_pool slot holds its request's pages
per schedule bin (`slot_table`, written when the request's prompt is extended, the only time the host sees rid and
slot together), and the captured prep derives the block table, each row's page budget (the bin of its KV length,
as `Schedule.budget_at`) and the attended-token accounting from `req_pool_indices` and `seq_lens` alone. Accounting
accumulates per slot on the device (padded rows add zero) and is read once, when the request's report is popped
(or earlier, when a retracted request's slot changes hands: `RequestRegistry.bind_slot`).
Reused pieces of the embedded engine's graph decode (`engine/cuda_graph.py`): the per-bin page table of a schedule
and the Triton kernels (`select_pages_into` with the engine's scoring launch, `triton_attend_pages`,
`append_decode`). On CPU the same buffers feed the torch reference (`sparse_decode`), which is how the CPU tests
drive the hooks.
"""

from __future__ import annotations

import numpy as np
import torch

from sparrow_sgl.attention import PageSummaries, sparse_decode
from sparrow_sgl.config import Schedule, SparsityConfig


def bin_pages(schedule: Schedule, width: int) -> np.ndarray:
    """Pages per bin [MAX_BINS] int32 (dense bins = width, the last bin repeated), as the engine's graph table."""
    from sparrow_sgl.engine.cuda_graph import budget_table

    return budget_table(schedule, width)[0]


class GraphDecodeState:
    """Device buffers shared by every captured batch size; rows [:bs] serve a batch of bs (padded) requests."""

    def __init__(
        self,
        req_to_token: torch.Tensor,
        cfg: SparsityConfig,
        default: Schedule,
        max_bs: int,
        kv_heads: int,
        num_sparse_layers: int,
    ) -> None:
        from sparrow_sgl.engine.cuda_graph import MAX_BINS, select_launches

        self.one_launch_select = select_launches() == 1  # the engine's choice (SPARROW_SELECT_LAUNCHES)
        dev, page = req_to_token.device, cfg.page_size
        self.cfg, self.req_to_token, self.max_bins = cfg, req_to_token, MAX_BINS
        self.num_sparse_layers = num_sparse_layers
        self.width = -(-req_to_token.shape[1] // page)  # block-table columns: pages of the longest context
        slots = req_to_token.shape[0]
        self.slot_table = torch.from_numpy(bin_pages(default, self.width)).to(dev).repeat(slots, 1)
        self.slot_bin_tokens = torch.full((slots,), default.bin_tokens, dtype=torch.int32, device=dev)
        self.slot_kv_tokens = torch.zeros(slots, dtype=torch.float64, device=dev)  # attended tokens x sparse layers
        self.slot_steps = torch.zeros(slots, dtype=torch.int64, device=dev)  # (sparse layer, decode step) pairs
        self.block_table = torch.zeros(max_bs, self.width, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.budget_pages = torch.ones(max_bs, dtype=torch.int32, device=dev)  # min(budget, pages) per row
        self.attended = torch.zeros(max_bs, dtype=torch.float32, device=dev)  # per row, one sparse layer
        self.pages = torch.zeros(max_bs, kv_heads, self.width, dtype=torch.int32, device=dev)
        self.scores = torch.zeros(max_bs, kv_heads, self.width, dtype=torch.float32, device=dev)
        self.counters = torch.zeros(max_bs * kv_heads, dtype=torch.int32, device=dev)  # selection tickets, kept 0
        self.n_live = torch.zeros((), dtype=torch.int64, device=dev)  # rows of the batch that are real requests
        self.rows = torch.arange(max_bs, device=dev)

    # -- host side --------------------------------------------------------------------------------------------------
    def bind(self, schedules: list[Schedule], slots: list[int], fresh: list[bool]) -> None:
        """Give the slots of an extended batch their requests' schedules; restart the counters of the `fresh` ones."""
        if not schedules:
            return
        dev = self.slot_table.device
        tables = np.stack([bin_pages(s, self.width) for s in schedules])
        bin_tokens = np.array([s.bin_tokens for s in schedules], dtype=np.int32)
        index = torch.tensor(slots, dtype=torch.long, device=dev)
        self.slot_table[index] = torch.from_numpy(tables).to(dev)
        self.slot_bin_tokens[index] = torch.from_numpy(bin_tokens).to(dev)
        restart = index[torch.tensor(fresh, dtype=torch.bool, device=dev)]
        self.slot_kv_tokens[restart] = 0.0
        self.slot_steps[restart] = 0

    def set_live(self, n: int) -> None:
        """Rows [:n] of the next replayed batch are requests, the rest padding (a device fill, no sync)."""
        self.n_live.fill_(n)

    def read(self, slot: int) -> tuple[float, int]:
        """(attended KV tokens summed over sparse layer steps, sparse layer steps) of a slot since its bind."""
        return float(self.slot_kv_tokens[slot]), int(self.slot_steps[slot])

    # -- device side: recorded in the graph -------------------------------------------------------------------------
    def prepare(self, forward_batch) -> None:
        """The captured prep: block table, page budgets and accounting of the batch's rows from static inputs only."""
        bs, page, cfg = forward_batch.batch_size, self.cfg.page_size, self.cfg
        slots = forward_batch.req_pool_indices[:bs].long()
        seq = forward_batch.seq_lens[:bs].long().clamp(min=1)  # capture warm-up may hold zeros
        self.block_table[:bs].copy_(self.req_to_token.index_select(0, slots)[:, ::page] // page)
        n_pages = (seq + page - 1) // page
        bins = torch.div(seq, self.slot_bin_tokens[slots], rounding_mode="floor").clamp(max=self.max_bins - 1)
        k = torch.minimum(self.slot_table[slots, bins].long(), n_pages)
        self.seq_lens[:bs].copy_(seq)
        self.budget_pages[:bs].copy_(k)
        # the top-k keeps every forced page (sink + local, lowest index first on ties), so the last, partial page is
        # among the k exactly when k covers all forced pages
        forced = n_pages.clamp(max=cfg.sink_pages + cfg.local_pages)
        last_fill = seq - (n_pages - 1) * page
        attended = torch.where(k >= n_pages, seq, torch.where(k >= forced, (k - 1) * page + last_fill, k * page))
        self.attended[:bs].copy_(attended)
        live = (self.rows[:bs] < self.n_live).long() * self.num_sparse_layers
        self.slot_kv_tokens.index_add_(0, slots, (attended * live).double())
        self.slot_steps.index_add_(0, slots, live)

    def append_summaries(self, summaries: PageSummaries, cache_loc: torch.Tensor, keys: torch.Tensor,
                         triton: bool | None = None) -> None:
        """One decode token per row into its page summary (padded rows write the reserved page 0).

        triton: the graph-capturable Triton append (default on CUDA); else the torch reference (CPU)."""
        page = self.cfg.page_size
        loc = cache_loc.long()
        if keys.is_cuda if triton is None else triton:
            from sparrow_sgl.attention.kernels.triton_summaries import append_decode

            append_decode(summaries, loc // page, loc % page, keys, minmax=summaries.has_minmax)
        else:
            summaries.append(loc // page, loc % page, keys)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, summaries: PageSummaries,
               scale: float, triton: bool | None = None) -> torch.Tensor:
        """Sparse decode of q [bs, q_heads, D] over the NHD paged caches with this step's budgets.

        triton: the sync-free Triton selection + decode (default on CUDA); else the torch reference (CPU)."""
        bs, cfg = q.shape[0], self.cfg
        block_table, seq_lens, budget = self.block_table[:bs], self.seq_lens[:bs], self.budget_pages[:bs]
        if not (q.is_cuda if triton is None else triton):
            return sparse_decode(q, k_cache, v_cache, block_table, seq_lens, budget * cfg.page_size, cfg,
                                 summaries=summaries, scale=scale)
        from sparrow_sgl.attention.kernels.triton_decode import triton_attend_pages
        from sparrow_sgl.attention.kernels.triton_score_heads import use_all_heads
        from sparrow_sgl.attention.kernels.triton_select import select_pages_into

        pages = self.pages[:bs]
        select_pages_into(q, block_table, seq_lens, budget, cfg, pages, key_sum=summaries.key_sum,
                          count=summaries.count, key_min=summaries.key_min, key_max=summaries.key_max,
                          scores=self.scores[:bs], counters=self.counters, one_launch=self.one_launch_select,
                          all_heads=use_all_heads())
        counts = budget[:, None]  # every KV head of a row keeps the row's page count (size-1 dim broadcasts)
        out = triton_attend_pages(q.to(k_cache.dtype), k_cache, v_cache, block_table, seq_lens, pages, counts, cfg,
                                  scale)
        return out.to(q.dtype)
