"""Teacher-forced forward pass with the rollout's sparse attention (the correctness core of DistillSparse).

A decode step at position t (its KV length t + 1 includes the token itself) attends only to the pages that
`sparrow_sgl.attention.select_pages` picks for budget `schedule.budget_at(t + 1)`. Teacher forcing reproduces it
in one pass: every query at t >= prompt_len gets a [kv] mask of exactly those pages, queries of the prompt attend
causally (the prefill is dense), and the layers in `schedule.dense_layers` stay dense. Each layer selects from
its own post-RoPE keys and queries, so the hidden states feeding later layers are the sparse decode's own.

Why scoring pages from the full-sequence keys is exact: for the query at t, every page before the one holding t
is complete, so its centroid (or min/max) equals the decode's; the page holding t is partial — its summary would
differ — but it is always one of the `local_pages` (>= 1) forced pages, so its score is never used.

Mechanism: an attention function registered with transformers' `AttentionInterface`, switched on for the model
only inside `sparse_attention(model, plan)`; the per-batch plan (prompt lengths, schedule) lives in a small
context object, nano-vllm style. CPU: a boolean [B, H, T, T] mask and SDPA (O(T^2) memory per layer); CUDA:
`flex_attention` with a mask_mod over the per-query page selection when available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparrow_sgl.attention import PageSummaries, select_pages
from sparrow_sgl.config import Schedule, SparsityConfig

ATTN_NAME = "sparrow_sparse"
_SCORE_BYTES = 256 * 2**20  # cap on the gathered page summaries per selection chunk


@dataclass
class SparsePlan:
    """What the attention function needs for one batch: where decode starts in each row and the schedule."""

    prompt_lens: torch.Tensor  # [batch] long: queries at t >= prompt_lens[b] are decode steps
    schedule: Schedule
    backend: str = "auto"  # "auto" | "sdpa" | "flex"

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"backend must be 'auto', 'sdpa' or 'flex', got {self.backend!r}")
        self.prompt_lens = torch.as_tensor(self.prompt_lens, dtype=torch.long)
        if self.prompt_lens.dim() != 1 or bool((self.prompt_lens < 1).any()):
            raise ValueError("prompt_lens must be a 1-D tensor of lengths >= 1 (the prefill holds at least one token)")

    @property
    def sparsity(self) -> SparsityConfig:
        # The selection below reads keys laid out as [pages, kv_heads, page_size, head_dim].
        return dataclasses.replace(self.schedule.sparsity(), kv_layout="HND")


_current: SparsePlan | None = None


@contextlib.contextmanager
def sparse_attention(model: torch.nn.Module, plan: SparsePlan) -> Iterator[None]:
    """Run `model` (a transformers causal LM, possibly peft-wrapped) with the rollout's sparse attention."""
    global _current
    _register()
    config = _find_config(model)
    previous_impl, previous_plan = config._attn_implementation, _current
    config._attn_implementation, _current = ATTN_NAME, plan
    try:
        yield
    finally:
        config._attn_implementation, _current = previous_impl, previous_plan


def sparse_forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    prompt_lens: torch.Tensor | Sequence[int],
    schedule: Schedule,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Logits [B, T, V] of right-padded `input_ids` [B, T] under the sparse rollout attention.

    Positions are 0..T-1 in every row (right padding never shifts them); pad queries are computed but meaningless.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    plan = SparsePlan(torch.as_tensor(prompt_lens, dtype=torch.long, device=input_ids.device), schedule, backend)
    if plan.prompt_lens.shape[0] != input_ids.shape[0]:
        raise ValueError(f"got {plan.prompt_lens.shape[0]} prompt lengths for a batch of {input_ids.shape[0]}")
    with sparse_attention(model, plan):
        return model(input_ids=input_ids, use_cache=False).logits


def response_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    schedule: Schedule | None,
    *,
    temperature: float = 1.0,
    return_full: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log-probs of the response tokens under the sparse rollout policy (None = dense).

    Returns (logprobs [B, R] float32, mask [B, R] bool, full [B, R, V] log-softmax or None), R = longest response,
    right-padded. Response token i of a row comes from the query at prompt_len + i - 1: token 0 from the dense
    prefill, the rest from sparse decode steps — exactly as the engine samples them. Differentiable.
    """
    input_ids, prompt_lens, response_lens = pack_right_padded(prompt_ids, response_ids, _model_device(model))
    if schedule is None or schedule.is_dense:
        logits = model(input_ids=input_ids, use_cache=False).logits
    else:
        logits = sparse_forward_logits(model, input_ids, prompt_lens, schedule, backend=backend)
    return gather_response_logprobs(logits, input_ids, prompt_lens, response_lens, temperature, return_full)


def sparse_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    schedule: Schedule | None,
    *,
    temperature: float = 1.0,
    keep_dist: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`RolloutBatch`-aligned log-probs: column j holds token j's log-prob from the logits at j - 1 (column 0: 0).

    input_ids [B, L] right-padded (the batch's own layout). Returns (logprobs [B, L] float32, full log-distributions
    [B, L, V] or None) under the sparse rollout attention (dense when `schedule` is None or dense). Differentiable.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if schedule is None or schedule.is_dense:
        logits = model(input_ids=input_ids, use_cache=False).logits
    else:
        logits = sparse_forward_logits(model, input_ids, prompt_lens, schedule, backend=backend)
    log_dist = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    picked = log_dist.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logprobs = torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)
    full = torch.cat([torch.zeros_like(log_dist[:, :1]), log_dist], dim=1) if keep_dist else None
    return logprobs, full


def pack_right_padded(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[prompt + response] rows right-padded with 0 -> (input_ids [B, T], prompt_lens [B], response_lens [B])."""
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(f"need as many prompts as responses (>= 1), got {len(prompt_ids)} and {len(response_ids)}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt must hold at least one token")
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    input_ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    prompt_lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    response_lens = torch.tensor([len(r) for r in response_ids], dtype=torch.long)
    return input_ids.to(device), prompt_lens.to(device), response_lens.to(device)


def gather_response_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    response_lens: torch.Tensor,
    temperature: float = 1.0,
    return_full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pick each response token's log-prob from the logits of the position before it (temperature applied)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    batch, total = input_ids.shape
    width = max(int(response_lens.max()), 1)
    steps = torch.arange(width, device=input_ids.device)
    mask = steps[None, :] < response_lens[:, None]
    targets_at = (prompt_lens[:, None] + steps[None, :]).clamp(max=total - 1)
    source_at = targets_at - 1
    rows = torch.arange(batch, device=input_ids.device)[:, None]
    full = torch.log_softmax(logits[rows, source_at].float() / temperature, dim=-1)  # [B, R, V]
    targets = input_ids[rows, targets_at]
    logprobs = full.gather(-1, targets[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    return logprobs, mask, (full if return_full else None)


# -- the attention function ----------------------------------------------------------------------------------------


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None)."""
    plan = _current
    if plan is None:
        raise RuntimeError("sparse attention used outside `sparse_attention(model, plan)`")
    if query.shape[2] != key.shape[2]:
        raise ValueError("the sparse teacher-forced forward takes the whole sequence at once (no KV cache)")
    layer = getattr(module, "layer_idx", None)
    dense = plan.sparsity.is_dense_layer(layer) or plan.schedule.is_dense
    selection = None if dense else query_page_selection(query, key, plan)
    if _use_flex(plan, query):
        out = _flex_attend(query, key, value, selection, plan, scaling)
    else:
        out = _sdpa_attend(query, key, value, selection, plan, scaling)
    return out.transpose(1, 2).contiguous(), None


def query_page_selection(query: torch.Tensor, key: torch.Tensor, plan: SparsePlan) -> torch.Tensor | None:
    """Pages each decode query attends to: bool [B, Hkv, T, n_pages] (None when every query is dense).

    Rows of prompt queries (and queries whose budget covers their whole KV) are all True: causality is applied
    by the caller. Each decode query is handed to `select_pages` as a one-token decode request over its row's
    pages, so the selection rules (scorer, sink/local pages, top-k) are the engine's own.
    """
    cfg = plan.sparsity
    batch, kv_heads, total, head_dim = key.shape
    page_size = cfg.page_size
    n_pages = -(-total // page_size)
    budgets = _budget_per_kv_len(plan.schedule, total, query.device)  # [T]: budget at KV length t + 1, -1 = dense
    positions = torch.arange(total, device=query.device)
    needed = (budgets >= 0) & (budgets // page_size < (positions + page_size) // page_size)  # budget < its pages
    decode = positions[None, :] >= plan.prompt_lens.to(query.device)[:, None]
    rows, steps = torch.nonzero(decode & needed[None, :], as_tuple=True)
    if rows.numel() == 0:
        return None
    pages = torch.ones(batch, kv_heads, total, n_pages, dtype=torch.bool, device=query.device)
    summaries = _page_summaries(key, n_pages, cfg)
    block_table = rows[:, None] * n_pages + torch.arange(n_pages, device=query.device)[None, :]
    chunk = max(1, _SCORE_BYTES // (n_pages * kv_heads * head_dim * 4))
    for start in range(0, rows.numel(), chunk):
        r, s = rows[start : start + chunk], steps[start : start + chunk]
        q = query[r, :, s, :]  # [N, Hq, D]
        sel = select_pages(q, summaries, block_table[start : start + chunk], s + 1, budgets[s], cfg)
        chosen = torch.zeros(r.numel(), kv_heads, n_pages + 1, dtype=torch.bool, device=query.device)
        chosen.scatter_(-1, torch.where(sel.valid, sel.pages, n_pages), True)  # invalid entries land in the spare
        pages[r, :, s, :] = chosen[..., :n_pages]
    return pages


def _budget_per_kv_len(schedule: Schedule, total: int, device) -> torch.Tensor:
    """budget_at(t + 1) for t in [0, total) as a tensor; -1 where the schedule is dense."""
    values = [schedule.budget_at(t + 1) for t in range(total)]
    return torch.tensor([-1 if b is None else b for b in values], dtype=torch.long, device=device)


def _page_summaries(key: torch.Tensor, n_pages: int, cfg: SparsityConfig) -> PageSummaries:
    """Summaries of every page of every row; page p of row b is physical page b * n_pages + p."""
    batch, kv_heads, total, head_dim = key.shape
    padded = F.pad(key.detach().float(), (0, 0, 0, n_pages * cfg.page_size - total))
    cache = padded.view(batch, kv_heads, n_pages, cfg.page_size, head_dim).transpose(1, 2)
    cache = cache.reshape(batch * n_pages, kv_heads, cfg.page_size, head_dim)  # HND paged cache
    table = torch.arange(batch * n_pages, device=key.device).view(batch, n_pages)
    lengths = torch.full((batch,), total, dtype=torch.long, device=key.device)
    return PageSummaries.from_cache(cache, table, lengths, cfg)


def _token_mask(selection: torch.Tensor | None, total: int, page_size: int, device) -> torch.Tensor:
    """bool [B or 1, Hkv or 1, T, T]: causal, and within the selected pages for decode queries."""
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    if selection is None:
        return causal[None, None]
    tokens = selection.repeat_interleave(page_size, dim=-1)[..., :total]
    return tokens & causal


def _sdpa_attend(query, key, value, selection, plan: SparsePlan, scaling) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    mask = _token_mask(selection, query.shape[2], plan.sparsity.page_size, query.device)
    if mask.shape[1] > 1:
        mask = mask.repeat_interleave(groups, dim=1)  # query head h reads KV head h // groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def _use_flex(plan: SparsePlan, query: torch.Tensor) -> bool:
    if plan.backend == "sdpa" or (plan.backend == "auto" and query.device.type != "cuda"):
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        if plan.backend == "flex":
            raise
        return False
    return True


def _flex_attend(query, key, value, selection, plan: SparsePlan, scaling) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    batch, q_heads, total, _ = query.shape
    groups = q_heads // key.shape[1]
    page_size = plan.sparsity.page_size

    if selection is None:
        def mask_mod(b, h, q, kv):
            return kv <= q
    else:
        def mask_mod(b, h, q, kv):
            return (kv <= q) & selection[b, h // groups, q, kv // page_size]

    block_mask = create_block_mask(mask_mod, batch, q_heads, total, total, device=query.device, _compile=True)
    return _compiled_flex()(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1)


@functools.cache
def _compiled_flex():
    """flex_attention only fuses (no [T, T] scores in memory) when compiled; compiled once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


# -- plumbing ------------------------------------------------------------------------------------------------------


def _register() -> None:
    from transformers import AttentionInterface

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, sparse_attention_forward)


def _find_config(model: torch.nn.Module):
    for candidate in (model, getattr(model, "base_model", None), getattr(model, "model", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            return config
    raise TypeError(f"{type(model).__name__} has no transformers config; expected a (peft-wrapped) causal LM")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
