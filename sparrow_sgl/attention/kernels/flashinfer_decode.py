"""Block-sparse decode through FlashInfer's `BatchDecodeWithPagedKVCacheWrapper`, one page list per KV head.

FlashInfer takes one page list per request, shared by its KV heads. Selection is per (request, KV head), so an HND
cache [pages, kv_heads, page, dim] is viewed (no copy) as [pages * kv_heads, 1, page, dim]: element (p * kv_heads
+ h) is head h of page p, and every (request, KV head) becomes one single-KV-head "request" whose query heads are
its GQA group. Measured on an H100 this costs the same as shared page lists (shared/gpu/README.md).

The index math (`per_head_view`, `selection_to_csr`, `dense_csr`) is plain torch and runs on CPU; FlashInfer is
imported only when a decoder is built.
"""

from __future__ import annotations

import math
import os

import torch

from sparrow_sgl.attention.select import Selection

# Group sizes FlashInfer's CUDA-core decode kernel is compiled for (SPARROW_FLASHINFER_TENSOR_CORES=0 keeps them there)
CUDA_CORE_GROUPS = (1, 2, 3, 4, 6, 8, 16)
TENSOR_CORES_ENV = "SPARROW_FLASHINFER_TENSOR_CORES"  # 1 (default): tensor cores from GQA group 4 on; 0: old rule
WORKSPACE_BYTES = 128 * 1024 * 1024


def use_tensor_cores(group: int) -> bool:
    """FlashInfer's decode path for a GQA group: tensor cores from group 4 on, as SGLang 0.5.23 decides (default), or
    with SPARROW_FLASHINFER_TENSOR_CORES=0 CUDA cores wherever compiled for the group. On an H200 (NOTES.md session
    8, call 15) the tensor-core path made the engine's FlashInfer dense step at 32K 1.6x faster for group 4 (4B:
    49.9 -> 30.3 ms, level with the Triton default) and its FlashInfer sparse rollouts 19-21% shorter."""
    setting = os.environ.get(TENSOR_CORES_ENV, "").strip() or "1"
    if setting not in ("0", "1"):
        raise ValueError(f"{TENSOR_CORES_ENV}={setting!r}: expected 0 or 1")
    return group >= 4 if setting == "1" else group not in CUDA_CORE_GROUPS


def per_head_view(cache_hnd: torch.Tensor) -> torch.Tensor:
    """[pages, kv_heads, page, dim] (contiguous) -> [pages * kv_heads, 1, page, dim], sharing storage."""
    if cache_hnd.dim() != 4 or not cache_hnd.is_contiguous():
        raise ValueError(f"per-head view needs a contiguous HND cache, got shape {tuple(cache_hnd.shape)}")
    pages, kv_heads, page_size, dim = cache_hnd.shape
    return cache_hnd.view(pages * kv_heads, 1, page_size, dim)


def per_head_page_ids(physical: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Ids in the per-head view of physical pages [batch, kv_heads, K]: physical * kv_heads + head."""
    heads = torch.arange(kv_heads, device=physical.device, dtype=physical.dtype)
    return physical * kv_heads + heads[None, :, None]


def selection_to_csr(
    selection: Selection, block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer ragged page lists, one row per (request, KV head) in row order b * kv_heads + h.

    Returns int32 (indptr [rows + 1], indices [total] per-head-view page ids, last_page_len [rows]); the last page
    of a row is partial only when it is the request's final page. Rows must select at least one page.
    """
    batch = block_table.shape[0]
    pages = selection.pages.expand(batch, kv_heads, -1)
    valid = selection.valid.expand(batch, kv_heads, -1)
    counts = valid.sum(-1).reshape(-1)
    if bool((counts == 0).any()):
        raise ValueError("every (request, KV head) must select at least one page")
    physical = block_table.long().gather(1, pages.reshape(batch, -1)).view_as(pages)
    indices = per_head_page_ids(physical, kv_heads)[valid]  # valid entries are a prefix of each row: order kept
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=block_table.device)
    indptr[1:] = counts.cumsum(0)
    last_page = pages.gather(-1, (valid.sum(-1, keepdim=True) - 1)).reshape(-1)
    seq = seq_lens.to(block_table.device).long().repeat_interleave(kv_heads)
    n_pages = (seq + page_size - 1) // page_size
    last_len = torch.where(last_page == n_pages - 1, seq - (n_pages - 1) * page_size, page_size)
    return indptr, indices.to(torch.int32), last_len.to(torch.int32)


def dense_csr(
    block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer ragged page lists of every page of every request (pages shared by the KV heads)."""
    seq = seq_lens.to(block_table.device).long()
    n_pages = (seq + page_size - 1) // page_size
    mask = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < n_pages[:, None]
    indptr = torch.zeros(seq.numel() + 1, dtype=torch.int32, device=block_table.device)
    indptr[1:] = n_pages.cumsum(0)
    last_len = seq - (n_pages - 1) * page_size
    return indptr, block_table[mask].to(torch.int32), last_len.to(torch.int32)


def row_start_from_counts(row_counts: torch.Tensor) -> torch.Tensor:
    """indptr [rows + 1] int32 from pages per row (the Triton selection writes row r at indptr[r])."""
    indptr = torch.zeros(row_counts.numel() + 1, dtype=torch.int32, device=row_counts.device)
    indptr[1:] = row_counts.reshape(-1).cumsum(0)
    return indptr


def _host_int32(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int32, device="cpu")


def _host_indptr(counts) -> tuple[torch.Tensor, int]:
    """CPU int32 indptr [n + 1] of host counts, and its total: FlashInfer plans from host data without a sync."""
    counts = _host_int32(counts).reshape(-1)
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    indptr[1:] = counts.cumsum(0)
    return indptr, int(indptr[-1])


def _wrapper(kv_layout: str, group: int, use_cuda_graph: bool, device: torch.device, buffers: dict, workspace=None):
    """workspace: FlashInfer's float scratch; wrappers that never run at the same time may share one."""
    import flashinfer

    if workspace is None:
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, kv_layout, use_cuda_graph=use_cuda_graph, use_tensor_cores=use_tensor_cores(group),
        **buffers,
    )


class FlashInferSparseDecoder:
    """Per-(request, KV head) block-sparse decode over an HND cache, with buffers the Triton selection fills.

    plan() once per change of page counts (host sync; a budget bin change, not every step); then each step: the
    selection kernel writes `indices` / `last_len` in place (pass `csr` to `select_pages_into`), and run() attends.
    With use_cuda_graph the whole step (selection + run) can be captured after plan().
    """

    def __init__(
        self, batch: int, kv_heads: int, q_heads: int, head_dim: int, page_size: int, max_pages_per_row: int,
        dtype: torch.dtype, device: torch.device | str, use_cuda_graph: bool = False, workspace=None,
    ) -> None:
        if q_heads % kv_heads:
            raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
        self.batch, self.kv_heads, self.q_heads, self.head_dim = batch, kv_heads, q_heads, head_dim
        self.group, self.page_size, self.dtype = q_heads // kv_heads, page_size, dtype
        self.rows = batch * kv_heads
        device = torch.device(device)
        self.indptr = torch.zeros(self.rows + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(self.rows * max_pages_per_row, dtype=torch.int32, device=device)
        self.last_len = torch.full((self.rows,), page_size, dtype=torch.int32, device=device)
        buffers = {}
        if use_cuda_graph:
            buffers = dict(paged_kv_indptr_buffer=self.indptr, paged_kv_indices_buffer=self.indices,
                           paged_kv_last_page_len_buffer=self.last_len)
        self.wrapper = _wrapper("HND", self.group, use_cuda_graph, device, buffers, workspace)

    @property
    def csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, row_start, last_len) for `select_pages_into(..., csr=...)`."""
        return self.indices, self.indptr[:-1], self.last_len

    def plan(self, row_counts: torch.Tensor, scale: float | None = None) -> None:
        """Fix the pages per row ([rows] = [batch * kv_heads], or [batch] repeated over heads)."""
        if row_counts.numel() == self.batch and self.kv_heads > 1:
            row_counts = row_counts.repeat_interleave(self.kv_heads)
        self.indptr.copy_(row_start_from_counts(row_counts.to(self.indptr.device)))
        total = int(self.indptr[-1])
        if total > self.indices.numel():
            raise ValueError(f"{total} pages exceed the decoder's {self.indices.numel()}-entry page list")
        self.wrapper.plan(
            self.indptr, self.indices[:total], self.last_len, self.group, 1, self.head_dim, self.page_size,
            q_data_type=self.dtype, kv_data_type=self.dtype,
            sm_scale=1.0 / math.sqrt(self.head_dim) if scale is None else scale,
        )

    def plan_host(self, row_counts, last_len, scale: float | None = None) -> None:
        """plan() from host data (no device sync): pages [rows] and last-page lengths [rows] of every row."""
        indptr, total = _host_indptr(row_counts)
        if total > self.indices.numel():
            raise ValueError(f"{total} pages exceed the decoder's {self.indices.numel()}-entry page list")
        self.wrapper.plan(
            indptr, self.indices[:total], _host_int32(last_len), self.group, 1, self.head_dim, self.page_size,
            q_data_type=self.dtype, kv_data_type=self.dtype,
            sm_scale=1.0 / math.sqrt(self.head_dim) if scale is None else scale,
        )

    def run(self, q: torch.Tensor, k_cache_hnd: torch.Tensor, v_cache_hnd: torch.Tensor, out=None) -> torch.Tensor:
        q_rows = q.view(self.rows, self.group, self.head_dim)
        out_rows = None if out is None else out.view(self.rows, self.group, self.head_dim)
        res = self.wrapper.run(q_rows, (per_head_view(k_cache_hnd), per_head_view(v_cache_hnd)), out=out_rows)
        return res.view(self.batch, self.q_heads, self.head_dim)


class FlashInferDenseDecoder:
    """Plain FlashInfer paged decode over every page (pages shared by the KV heads), either layout."""

    def __init__(
        self, kv_layout: str, group: int, device: torch.device | str, use_cuda_graph: bool = False,
        batch: int = 0, max_pages: int = 0, workspace=None,
    ) -> None:
        """use_cuda_graph needs the fixed batch and the most pages all requests hold together."""
        self.kv_layout = kv_layout
        device = torch.device(device)
        buffers = {}
        if use_cuda_graph:
            buffers = dict(
                paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=device),
            )
        self.buffers = buffers  # graph mode: the indices buffer can be filled on the device (see plan_host)
        self.wrapper = _wrapper(kv_layout, group, use_cuda_graph, device, buffers, workspace)

    def plan(self, block_table, seq_lens, q_heads, kv_heads, head_dim, page_size, dtype, scale=None) -> None:
        indptr, indices, last_len = dense_csr(block_table, seq_lens, page_size)
        self.wrapper.plan(
            indptr, indices, last_len, q_heads, kv_heads, head_dim, page_size, q_data_type=dtype, kv_data_type=dtype,
            sm_scale=1.0 / math.sqrt(head_dim) if scale is None else scale,
        )

    def plan_host(self, n_pages, last_len, q_heads, kv_heads, head_dim, page_size, dtype, scale=None) -> None:
        """Graph mode, plan from host page counts without touching the page ids: the caller writes request i's
        pages into `buffers["paged_kv_indices_buffer"][indptr[i]:indptr[i + 1]]` on the device before run()."""
        indptr, total = _host_indptr(n_pages)
        indices = self.buffers["paged_kv_indices_buffer"]
        if total > indices.numel():
            raise ValueError(f"{total} pages exceed the decoder's {indices.numel()}-entry page list")
        self.wrapper.plan(
            indptr, indices[:total], _host_int32(last_len), q_heads, kv_heads, head_dim, page_size,
            q_data_type=dtype, kv_data_type=dtype, sm_scale=1.0 / math.sqrt(head_dim) if scale is None else scale,
        )

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return self.wrapper.run(q, (k_cache, v_cache))


def flashinfer_attend_selection(
    q: torch.Tensor, k_cache_hnd: torch.Tensor, v_cache_hnd: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, selection: Selection, page_size: int, scale: float | None = None,
) -> torch.Tensor:
    """One-shot sparse decode of a `Selection` (plans every call: for tests and the un-captured path)."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache_hnd.shape[1]
    indptr, indices, last_len = selection_to_csr(selection, block_table, seq_lens, page_size, kv_heads)
    group = q_heads // kv_heads
    wrapper = _cached_wrapper("HND", group, q.device)
    wrapper.plan(indptr, indices, last_len, group, 1, head_dim, page_size, q_data_type=q.dtype,
                 kv_data_type=k_cache_hnd.dtype, sm_scale=1.0 / math.sqrt(head_dim) if scale is None else scale)
    out = wrapper.run(q.reshape(batch * kv_heads, group, head_dim),
                      (per_head_view(k_cache_hnd), per_head_view(v_cache_hnd)))
    return out.view(batch, q_heads, head_dim)


def flashinfer_attend_dense(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, kv_layout: str, page_size: int, scale: float | None = None,
) -> torch.Tensor:
    """One-shot dense paged decode (plans every call)."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1] if kv_layout == "HND" else k_cache.shape[2]
    indptr, indices, last_len = dense_csr(block_table, seq_lens, page_size)
    wrapper = _cached_wrapper(kv_layout, q_heads // kv_heads, q.device)
    wrapper.plan(indptr, indices, last_len, q_heads, kv_heads, head_dim, page_size, q_data_type=q.dtype,
                 kv_data_type=k_cache.dtype, sm_scale=1.0 / math.sqrt(head_dim) if scale is None else scale)
    return wrapper.run(q, (k_cache, v_cache))


_WRAPPERS: dict = {}


def _cached_wrapper(kv_layout: str, group: int, device: torch.device):
    key = (kv_layout, use_tensor_cores(group), str(device))
    if key not in _WRAPPERS:
        _WRAPPERS[key] = _wrapper(kv_layout, group, False, device, {})
    return _WRAPPERS[key]
