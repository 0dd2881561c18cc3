"""The paged KV pool: per-layer K/V pages in HND layout plus per-layer page summaries, sized from a memory budget."""

from __future__ import annotations

import torch

from sparrow_sgl.attention import PageSummaries
from sparrow_sgl.config import ConfigError, EngineConfig, Schedule

GIB = 1024**3
_SUMMARY_FIELDS = ("key_sum", "count", "key_min", "key_max")


def bytes_per_page(
    num_layers: int, kv_heads: int, page_size: int, head_dim: int, dtype: torch.dtype, minmax: bool = True,
    centroid_copy: bool = False,
) -> int:
    """Bytes one page takes over all layers: K and V plus the float32 summaries (sum and count; min and max only
    with `minmax`, i.e. for the quest scorer), plus the GPU decoder's bf16 centroid copy with `centroid_copy` (the
    centroid-bf16 scorer)."""
    kv = 2 * kv_heads * page_size * head_dim * dtype.itemsize
    summaries = (3 if minmax else 1) * kv_heads * head_dim * 4 + 4 + (kv_heads * head_dim * 2 if centroid_copy else 0)
    return num_layers * (kv + summaries)


def utilization_budget(total_bytes: int, held_bytes: int, utilization: float) -> float:
    """vLLM's `gpu_memory_utilization`: the engine may hold `utilization` of the device's total memory; the KV pool
    gets that minus what the engine already holds (its weights)."""
    budget = utilization * total_bytes - held_bytes
    if budget <= 0:
        raise ConfigError(
            f"gpu_memory_utilization {utilization} of {total_bytes / GIB:.1f} GiB leaves no KV cache: the engine "
            f"already holds {held_bytes / GIB:.2f} GiB (weights); raise --vllm.gpu_memory_utilization"
        )
    return budget


def plan_num_pages(cfg: EngineConfig, page_bytes: int) -> int:
    """Pages in the pool: `num_kv_pages`, else `kv_gb` GiB, else (CUDA) `gpu_memory_utilization` of total memory
    or `gpu_memory_fraction` of free memory, else a CPU default."""
    if cfg.num_kv_pages is not None:
        return cfg.num_kv_pages
    if cfg.kv_gb is not None:
        budget = cfg.kv_gb * GIB
    elif cfg.device.startswith("cuda"):
        device = torch.device(cfg.device)
        free, total = torch.cuda.mem_get_info(device)
        if cfg.gpu_memory_utilization is not None:
            budget = utilization_budget(total, torch.cuda.memory_reserved(device), cfg.gpu_memory_utilization)
        else:
            budget = free * cfg.gpu_memory_fraction
    else:
        budget = EngineConfig.DEFAULT_CPU_KV_GB * GIB
    pages = int(budget // page_bytes)
    if pages < 1:
        raise ConfigError(f"KV budget of {budget / GIB:.3g} GiB holds no page of {page_bytes} bytes; raise kv_gb")
    return pages


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        kv_heads: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        minmax: bool = True,
    ) -> None:
        """minmax: keep Quest's per-page key min/max (only the quest scorer reads them; centroid engines skip them)."""
        shape = (num_layers, num_pages, kv_heads, page_size, head_dim)
        # zeros, not empty: attention reads whole pages and masks the unwritten tail, which must not hold NaNs
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.summaries = [
            PageSummaries.allocate(num_pages, kv_heads, head_dim, device, minmax=minmax) for _ in range(num_layers)
        ]
        self.num_pages, self.page_size, self.has_minmax = num_pages, page_size, minmax

    @property
    def num_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def nbytes(self) -> int:
        """Bytes the pool's tensors hold (K, V and summaries); 0 once released."""
        summary_tensors = (getattr(s, name) for s in self.summaries for name in _SUMMARY_FIELDS)
        return self.k.nbytes + self.v.nbytes + sum(t.nbytes for t in summary_tensors if t is not None)

    def release(self, attention_layers) -> None:
        """Drop the pool's storage (sleep): the layers lose their slices, the tensors become empty."""
        self.k, self.v = self.k.new_empty(0), self.v.new_empty(0)
        for attn in attention_layers:
            attn.k_cache, attn.v_cache, attn.summaries = self.k, self.v, None
        self.summaries, self.num_pages = [], 0

    def check_schedule(self, schedule: Schedule) -> None:
        """A sparse quest schedule needs the min/max summaries, which a centroid engine does not keep."""
        if schedule.scorer == "quest" and not schedule.is_dense and not self.has_minmax:
            raise ConfigError(
                f"schedule {schedule.name or ''!r} scores pages with 'quest' (per-page key min/max), but this engine "
                "keeps centroid summaries only; build it with EngineConfig(scorer='quest') to serve quest schedules"
            )

    def bind(self, attention_layers) -> None:
        """Give each attention layer its slice of the pool."""
        for i, attn in enumerate(attention_layers):
            attn.k_cache, attn.v_cache, attn.summaries = self.k[i], self.v[i], self.summaries[i]

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy K, V and summaries of pages `src` to `dst` in every layer (copy-on-write of shared pages)."""
        if not src:
            return
        device = self.k.device
        src_t, dst_t = torch.tensor(src, device=device), torch.tensor(dst, device=device)
        self.k[:, dst_t] = self.k[:, src_t]
        self.v[:, dst_t] = self.v[:, src_t]
        for summaries in self.summaries:
            for name in _SUMMARY_FIELDS:
                tensor = getattr(summaries, name)
                if tensor is not None:
                    tensor[dst_t] = tensor[src_t]
