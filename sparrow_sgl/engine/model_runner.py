"""Runs one engine step on the model: builds the step's attention context (slots, block tables, lengths, budgets).

Prefill packs every new token of the admitted sequences into one batch and returns their final hidden states;
decode feeds each running sequence's last token and returns next-token logits plus the attended KV tokens.
On CUDA, decode runs the sync-free step of `cuda_graph.GraphDecodeRunner` (kernels, CUDA graphs); elsewhere (or
with SPARROW_GPU_DECODE=off) every layer calls the `sparse_decode` reference.
"""

from __future__ import annotations

import torch

from sparrow_sgl.config import Schedule, SparsityConfig
from sparrow_sgl.engine.context import Context, reset_context, set_context
from sparrow_sgl.engine.cuda_graph import GraphDecodeRunner, PendingSample, make_gpu_decoder
from sparrow_sgl.engine.kv_cache import KVCache
from sparrow_sgl.engine.model import Qwen3ForCausalLM
from sparrow_sgl.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: Qwen3ForCausalLM, kv_cache: KVCache, device: torch.device) -> None:
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.page_size = kv_cache.page_size
        self._table_key: tuple[int, ...] = ()
        self._table: torch.Tensor | None = None
        self._gpu: GraphDecodeRunner | bool | None = None  # built on first use; False where it does not apply
        self._dropped_captures = (0, 0.0)  # what the GPU decoders that rebind dropped had captured

    def rebind(self, kv_cache: KVCache | None) -> None:
        """A new KV pool (None: released): drop the cached block table and the GPU decoder, whose CUDA graphs
        captured the old pool's addresses (it is rebuilt on first use)."""
        self._dropped_captures = self.graph_captures()
        self.kv_cache, self._gpu = kv_cache, None
        self._table_key, self._table = (), None

    def graph_captures(self) -> tuple[int, float]:
        """(decode graphs captured, seconds spent capturing them) over this runner's life, rebinds included."""
        count, seconds = self._dropped_captures
        if self._gpu:
            count, seconds = count + self._gpu.captures, seconds + self._gpu.capture_s
        return count, seconds

    def gpu_decoder(self) -> GraphDecodeRunner | None:
        if self._gpu is None:
            self._gpu = make_gpu_decoder(self.model, self.device) or False
        return self._gpu or None

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """[batch, max_pages] padded with page 0; cached while the batch keeps the same sequences."""
        key = tuple(s.seq_id for s in seqs)
        if key != self._table_key:
            width = max(len(s.block_table) for s in seqs)
            rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
            self._table, self._table_key = self._tensor(rows, torch.int32), key
        return self._table

    def _slots(self, seqs: list[Sequence], spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical page and in-page offset of every new token (positions start..end-1 of each sequence)."""
        pages, offsets = [], []
        for seq, (start, end) in zip(seqs, spans):
            positions = torch.arange(start, end)
            pages.append(torch.tensor(seq.block_table)[positions // self.page_size])
            offsets.append(positions % self.page_size)
        return torch.cat(pages).to(self.device), torch.cat(offsets).to(self.device)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], tokens: list[list[int]], sparsity: SparsityConfig) -> torch.Tensor:
        """Feed `tokens[i]` after the `num_cached` cached tokens of seqs[i]; returns packed hidden [T, hidden]."""
        spans = [(s.num_cached, s.num_cached + len(t)) for s, t in zip(seqs, tokens)]
        input_ids = self._tensor([t for toks in tokens for t in toks])
        positions = self._tensor([p for start, end in spans for p in range(start, end)])
        slot_pages, slot_offsets = self._slots(seqs, spans)
        set_context(
            Context(
                is_prefill=True,
                sparsity=sparsity,
                slot_pages=slot_pages,
                slot_offsets=slot_offsets,
                block_tables=self._block_tables(seqs),
                query_lens=[len(t) for t in tokens],
                prefill_kv_lens=[end for _, end in spans],
            )
        )
        gpu = self.gpu_decoder()
        try:
            hidden = self.model(input_ids, positions)
        finally:
            reset_context()
        if gpu is not None:
            gpu.refresh_centroids(slot_pages)  # the bf16 centroid copy, if kept, of the pages just written
        return hidden

    @torch.inference_mode()
    def launch_sample(self, seqs: list[Sequence], sparsity: SparsityConfig, schedule: Schedule,
                      sample_rows: list[list[float]], topk: int, after: PendingSample | None = None) -> PendingSample:
        """The CUDA decode step with the fused sampler in its graph (needs `gpu_decoder()`), launched: its rows
        (per sequence [token, log-prob, attended KV tokens, topk ids, topk log-probs]) are read from the result.
        after: the unread step of these sequences that this one follows (its tokens are fed on the device)."""
        ahead = 0 if after is None else 1
        return self.gpu_decoder().launch_sample(
            [s.last_token for s in seqs], [s.num_cached + ahead for s in seqs], [s.block_table for s in seqs],
            schedule, sparsity, sample_rows, topk, table_key=tuple(s.seq_id for s in seqs), after=after,
        )

    @torch.inference_mode()
    def decode(
        self,
        seqs: list[Sequence],
        budgets: list[int | None],
        sparsity: SparsityConfig,
        num_sparse_layers: int,
        schedule: Schedule | None = None,
        token_ids: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [B, V] float32 and mean attended KV tokens per sparse layer and KV head [B].

        With `schedule` given and a CUDA device, the GPU step computes the budgets itself from the schedule.
        token_ids: the tokens to feed one position past each sequence's last fed one (a step that follows an unread
        step); None: each sequence's last token, at its `num_cached`.
        """
        ahead = 0 if token_ids is None else 1
        token_ids = [s.last_token for s in seqs] if token_ids is None else token_ids
        host_positions = [s.num_cached + ahead for s in seqs]
        gpu = self.gpu_decoder() if schedule is not None else None
        if gpu is not None:
            return gpu.decode(token_ids, host_positions, [s.block_table for s in seqs], schedule, sparsity,
                              table_key=tuple(s.seq_id for s in seqs))
        positions = self._tensor(host_positions)
        seq_lens = positions + 1
        block_tables = self._block_tables(seqs)
        context = Context(
            is_prefill=False,
            sparsity=sparsity,
            slot_pages=block_tables.gather(1, (positions // self.page_size)[:, None])[:, 0].long(),
            slot_offsets=positions % self.page_size,
            block_tables=block_tables,
            seq_lens=seq_lens,
            budgets=self._tensor([-1 if b is None else b for b in budgets]),
            attended_tokens=torch.zeros(len(seqs), device=self.device),
        )
        set_context(context)
        try:
            hidden = self.model(self._tensor(token_ids), positions)
            logits = self.model.compute_logits(hidden)
        finally:
            reset_context()
        attended = context.attended_tokens / num_sparse_layers if num_sparse_layers else seq_lens.float()
        return logits, attended
