"""Kernels (Triton selection / decode / summary update, FlashInfer per-KV-head decode) equal the torch reference.

`-m gpu` tests run on the device machine. The CPU tests check the pure index math (per-head view, ragged page
lists, split planning, backend choice) and the benchmark helpers; with SPARROW_TRITON_INTERPRET=1 and triton
installed, the Triton kernels also run on CPU through Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from triton_helpers import HAS_TRITON, interpret_only, needs_triton

from sparrow_sgl.attention import PageSummaries, score_pages, select_pages
from sparrow_sgl.attention.attend import attend_pages
from sparrow_sgl.attention.decode import sparse_decode
from sparrow_sgl.attention.kernels import dispatch
from sparrow_sgl.attention.kernels.flashinfer_decode import (
    dense_csr,
    per_head_page_ids,
    per_head_view,
    row_start_from_counts,
    selection_to_csr,
)
from sparrow_sgl.attention.select import Selection
from sparrow_sgl.config import SparsityConfig

HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
needs_flashinfer = pytest.mark.skipif(not HAS_FLASHINFER, reason="needs flashinfer")


def make_problem(layout="HND", seq=(100, 300, 17, 64), q_heads=8, kv_heads=2, head_dim=128, dtype=torch.float32,
                 device="cpu", seed=0, page_size=16):
    """Random paged caches with pages scattered over a pool; block-table columns past a request's pages are -1."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq)
    seq_lens = torch.tensor(seq, dtype=torch.int32)
    n_pages = [math.ceil(s / page_size) for s in seq]
    max_pages = max(n_pages) + 2
    pool = sum(n_pages) + 7
    perm = torch.randperm(pool, generator=gen)
    block_table = torch.full((batch, max_pages), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(n_pages):
        block_table[b, :n] = perm[used : used + n].int()
        used += n
    shape = (pool, page_size, kv_heads, head_dim) if layout == "NHD" else (pool, kv_heads, page_size, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(dtype)
    return [t.to(device) for t in (q, k, v, block_table, seq_lens)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def reference_scores(q, summaries, block_table, seq_lens, cfg):
    """The reference's masked scores: forced pages +inf, missing pages -inf."""
    scores = score_pages(q.float(), summaries, block_table, cfg)
    n_pages = (seq_lens.long() + cfg.page_size - 1) // cfg.page_size
    idx = torch.arange(block_table.shape[1], device=q.device)[None, :]
    forced = (idx < cfg.sink_pages) | (idx >= n_pages[:, None] - cfg.local_pages)
    scores = scores.masked_fill(forced[:, None, :], float("inf"))
    return scores.masked_fill(~(idx < n_pages[:, None])[:, None, :], float("-inf"))


def assert_same_up_to_ties(got, ref, scores, rtol=1e-4):
    """Same number of pages per row, ascending, and no unselected page scores clearly above a selected one."""
    assert got.valid.shape == ref.valid.shape and torch.equal(got.valid.cpu(), ref.valid.cpu())
    pages, valid = got.pages.cpu(), got.valid.cpu()
    scores = scores.cpu()
    n = scores.shape[-1]
    chosen = torch.zeros(*scores.shape[:-1], n + 1, dtype=torch.bool)  # padding scatters into the extra column
    chosen = chosen.scatter_(-1, torch.where(valid, pages, n), valid)[..., :n]
    assert torch.equal(chosen.sum(-1), valid.sum(-1)), "duplicate pages in a row"
    steps = pages[..., 1:] - pages[..., :-1]
    assert bool((steps[valid[..., 1:]] > 0).all()), "pages not ascending"
    finite = lambda s, fill: torch.where(torch.isfinite(s), s, torch.full_like(s, fill))
    low = finite(scores.masked_fill(~chosen, float("inf")), 3e38).amin(-1)
    high = finite(scores.masked_fill(chosen, float("-inf")), -3e38).amax(-1)
    slack = rtol * (1 + torch.maximum(low.abs(), high.abs()))
    assert bool((high <= low + slack).all()), "an unselected page outscores a selected one"


def attend_csr_reference(q, k_view, v_view, indptr, indices, last_len, group):
    """What FlashInfer computes for per-(request, KV head) ragged page lists over the per-head view (torch)."""
    rows, _, page_size, head_dim = q.shape[0] * q.shape[1] // group, 1, k_view.shape[2], q.shape[-1]
    qr = q.float().reshape(rows, group, head_dim)
    outs = []
    for r in range(rows):
        ids = indices[indptr[r] : indptr[r + 1]].long()
        keys = k_view[ids, 0].float().reshape(-1, head_dim)
        values = v_view[ids, 0].float().reshape(-1, head_dim)
        n = (len(ids) - 1) * page_size + int(last_len[r])
        logits = qr[r] @ keys[:n].T / math.sqrt(head_dim)
        outs.append(torch.softmax(logits, -1) @ values[:n])
    return torch.stack(outs).reshape(q.shape)


# ---------------------------------------------------------------- CPU: index math and helpers

def test_per_head_view_indexes_head_h_of_page_p():
    cache = torch.randn(5, 3, 16, 8)
    view = per_head_view(cache)
    assert view.shape == (15, 1, 16, 8) and view.data_ptr() == cache.data_ptr()
    ids = per_head_page_ids(torch.tensor([[[4, 1], [0, 2], [3, 3]]]), kv_heads=3)
    for h in range(3):
        for i in range(2):
            p = int(torch.tensor([[4, 1], [0, 2], [3, 3]])[h, i])
            assert torch.equal(view[ids[0, h, i], 0], cache[p, h])
    with pytest.raises(ValueError, match="contiguous HND"):
        per_head_view(cache.transpose(1, 2))


@pytest.mark.parametrize("budget", [48, [32, 96, None, 48], 10_000])
def test_selection_csr_over_per_head_view_equals_reference(budget):
    cfg = SparsityConfig(kv_layout="HND")
    q, k, v, block_table, seq_lens = make_problem("HND")
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    selection = select_pages(q, summaries, block_table, seq_lens, budget, cfg)
    indptr, indices, last_len = selection_to_csr(selection, block_table, seq_lens, 16, kv_heads=2)
    assert indptr.dtype == indices.dtype == last_len.dtype == torch.int32
    assert int(indptr[-1]) == indices.numel() == int(selection.valid.expand(4, 2, -1).sum())
    out = attend_csr_reference(q, per_head_view(k), per_head_view(v), indptr, indices, last_len, group=4)
    ref = attend_pages(q, k, v, block_table, seq_lens, selection, cfg)
    assert rel_err(out, ref) < 1e-5


def test_dense_csr_lists_every_page():
    _, _, _, block_table, seq_lens = make_problem("HND", seq=(1, 16, 17, 40))
    indptr, indices, last_len = dense_csr(block_table, seq_lens, 16)
    assert indptr.tolist() == [0, 1, 2, 4, 7]
    assert last_len.tolist() == [1, 16, 1, 8]
    assert torch.equal(indices[4:7], block_table[3, :3])
    assert row_start_from_counts(torch.tensor([[2, 3], [1, 4]])).tolist() == [0, 2, 5, 6, 10]


@needs_triton
def test_plan_splits_covers_every_entry():
    from sparrow_sgl.attention.kernels.triton_decode import plan_splits

    for rows, entries in [(1, 1), (64, 512), (1024, 32), (16, 4096), (8, 3)]:
        splits, per_split = plan_splits(rows, entries, 4, num_sms=132)
        assert per_split % 4 == 0 and splits * per_split >= entries and (splits - 1) * per_split < entries


def test_pick_backend_cpu_is_torch_and_env_is_validated(monkeypatch):
    q, k, *_ = make_problem()
    assert dispatch.pick_backend(q, k, SparsityConfig(), sparse=True) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match="SPARROW_ATTN_BACKEND"):
        dispatch.pick_backend(q, k, SparsityConfig(), sparse=True)


def test_bench_helpers_parse_and_append(tmp_path):
    from bench.common import emit, parse_ints

    assert parse_ints("512, 1k,8K,64k") == [512, 1024, 8192, 65536]
    emit("unit", {"a": 1}, tmp_path)
    emit("unit", {"a": 2}, tmp_path)
    assert [r["a"] for r in json.loads((tmp_path / "unit.json").read_text())] == [1, 2]


def test_sparrow_bench_cli_parses():
    from sparrow_sgl.cli import build_parser

    argv = ["bench", "attention", "--contexts", "8k", "--batches", "8"]
    args = build_parser(argv).parse_args(argv)
    assert args.name == "attention" and args.bench_args == ["--contexts", "8k", "--batches", "8"]
    from sparrow_sgl.bench import load

    assert hasattr(load("selection"), "main")


# ---------------------------------------------------------------- kernels vs reference (GPU, or CPU interpreter)

def _devices():
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


def _kernel_test(fn):
    """Run on the GPU (marked gpu) and, when opted in, on the CPU interpreter."""
    return pytest.mark.parametrize("device", [
        pytest.param("cuda", marks=pytest.mark.gpu),
        pytest.param("cpu", marks=interpret_only),
    ])(needs_triton(fn))


@_kernel_test
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("scorer", ["centroid", "centroid-bf16", "quest"])
def test_triton_selection_matches_reference(device, layout, scorer):
    from sparrow_sgl.attention.kernels.triton_select import triton_select_pages

    cfg = SparsityConfig(kv_layout=layout, scorer=scorer)
    q, k, v, block_table, seq_lens = make_problem(layout, seq=(100, 300, 17, 1000, 64), device=device)
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    for budget in (48, [64, 96, None, 512, 16], 160):
        ref = select_pages(q, summaries, block_table, seq_lens, budget, cfg)
        got = triton_select_pages(q, summaries, block_table, seq_lens, budget, cfg)
        assert got.pages.shape == ref.pages.shape
        assert_same_up_to_ties(got, ref, reference_scores(q, summaries, block_table, seq_lens, cfg))


@_kernel_test
@pytest.mark.parametrize("all_heads", [False, True])
def test_bf16_centroid_scorer_scores_the_rounded_centroid_on_every_path(device, all_heads):
    """"centroid-bf16" from the float32 sums (rounded in the kernel) and from a bf16 centroid copy (the engine's)
    give the reference's scores and bit-identical page lists; the float32 "centroid" scorer's scores differ."""
    from sparrow_sgl.attention.kernels.triton_select import select_pages_into

    cfg = SparsityConfig(kv_layout="HND", scorer="centroid-bf16")
    q, k, _, block_table, seq_lens = make_problem("HND", seq=(100, 300, 17, 1000, 64), device=device)
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    copy = summaries.centroid().to(torch.bfloat16)
    limit = torch.tensor([3, 9, 2, 20, 4], dtype=torch.int32, device=device)
    runs = []
    for key_sum, count in ((summaries.key_sum, summaries.count), (copy, None)):
        pages = torch.full((5, 2, 32), -5, dtype=torch.int32, device=device)
        scores = select_pages_into(q, block_table, seq_lens, limit, cfg, pages, key_sum=key_sum, count=count,
                                   one_launch=False, all_heads=all_heads)
        runs.append((pages, scores))
    (pages_sums, scores_sums), (pages_copy, scores_copy) = runs
    assert torch.equal(pages_sums, pages_copy)
    ref = reference_scores(q, summaries, block_table, seq_lens, cfg)
    fp32 = reference_scores(q, summaries, block_table, seq_lens, SparsityConfig(kv_layout="HND"))
    exists = torch.isfinite(ref)
    for got in (scores_sums, scores_copy):
        torch.testing.assert_close(got[exists], ref[exists], rtol=1e-5, atol=1e-5)
    assert float((fp32[exists] - ref[exists]).abs().max()) > 1e-4, "bf16 rounding should move some scores"
    want = select_pages(q, summaries, block_table, seq_lens, (limit * 16).tolist(), cfg)
    got = Selection(pages=pages_sums[..., : want.pages.shape[2]].long(), valid=want.valid, n_pages=want.n_pages)
    assert_same_up_to_ties(got, want, ref, rtol=1e-6)


@_kernel_test
def test_triton_selection_writes_flashinfer_page_lists(device):
    from sparrow_sgl.attention.kernels.triton_select import select_pages_into

    cfg = SparsityConfig(kv_layout="HND")
    q, k, _, block_table, seq_lens = make_problem("HND", device=device)
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    limit = torch.tensor([3, 6, 9, 4], dtype=torch.int32, device=device)
    n_pages = (seq_lens + 15) // 16
    indptr = row_start_from_counts(torch.minimum(limit, n_pages).repeat_interleave(2))
    indices = torch.full((int(indptr[-1]),), -7, dtype=torch.int32, device=device)
    last_len = torch.zeros(8, dtype=torch.int32, device=device)
    pages = torch.full((4, 2, 9), -5, dtype=torch.int32, device=device)
    select_pages_into(q, block_table, seq_lens, limit, cfg, pages, key_sum=summaries.key_sum, count=summaries.count,
                      csr=(indices, indptr[:-1], last_len))
    ref = select_pages(q, summaries, block_table, seq_lens, (limit * 16).tolist(), cfg)
    want_indptr, want_indices, want_last = selection_to_csr(ref, block_table, seq_lens, 16, 2)
    assert torch.equal(indptr, want_indptr) and torch.equal(last_len, want_last)
    assert torch.equal(indices, want_indices)
    assert bool((pages >= 0).all()), "padding entries left unwritten"


def _select_both(q, summaries, block_table, seq_lens, limit, cfg, k_cols, device, tied=False, **kw):
    """(pages, csr indices, last_len, counters) of the one-launch kernel and the same of the two-launch baseline."""
    from sparrow_sgl.attention.kernels.triton_select import select_pages_into

    kv_heads = summaries.key_sum.shape[1]
    n_pages = (seq_lens.long() + 15) // 16
    indptr = row_start_from_counts(torch.minimum(limit.long(), n_pages).repeat_interleave(kv_heads))
    out = []
    for one_launch in (True, False):
        pages = torch.full((len(seq_lens), kv_heads, k_cols), -5, dtype=torch.int32, device=device)
        indices = torch.full((int(indptr[-1]),), -7, dtype=torch.int32, device=device)
        last_len = torch.zeros(len(seq_lens) * kv_heads, dtype=torch.int32, device=device)
        counters = torch.zeros(len(seq_lens) * kv_heads, dtype=torch.int32, device=device)
        select_pages_into(q, block_table, seq_lens, limit, cfg, pages, key_sum=summaries.key_sum,
                          count=summaries.count, key_min=summaries.key_min, key_max=summaries.key_max,
                          counters=counters, csr=(indices, indptr[:-1], last_len), one_launch=one_launch, **kw)
        out.append((pages, indices, last_len, counters))
    return out, indptr


@needs_triton
@pytest.mark.parametrize("env,value", [("SPARROW_SCORE_TILE", "128x128"), ("SPARROW_SCORE_TILE", "128,abc,4"),
                                       ("SPARROW_SCORE_TILE", "96x128x4"), ("SPARROW_TOPK_BITS", "3"),
                                       ("SPARROW_TOPK_BITS", "four"), ("SPARROW_TOPK_WARPS", "32"),
                                       ("SPARROW_TOPK_WARPS", "0"), ("SPARROW_TOPK_EXIT", "yes")])
def test_bad_selection_settings_are_clear_errors(monkeypatch, env, value):
    from sparrow_sgl.attention.kernels import triton_select

    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=env):
        triton_select.score_tiling(8, 256, torch.device("cpu"))
        triton_select.topk_bits(256)
        triton_select.topk_warps(256)
        triton_select.topk_early_exit()


@_kernel_test
@pytest.mark.parametrize("scorer", ["centroid", "quest"])
@pytest.mark.parametrize("chunk", [16, 2048])
@pytest.mark.parametrize("bits,warps,early", [("1", "", "1"), ("1", "", "0"), ("1", "1", "1"), ("2", "", "1"),
                                               ("2", "", "0"), ("4", "", "0"), ("8", "2", "0")])
def test_one_launch_selection_equals_two_launches_and_reference(device, scorer, chunk, bits, warps, early,
                                                                 monkeypatch):
    """Mixed lengths (1 page, partial pages, several top-k chunks), budgets below and above the pages, ties; the
    two-launch top-k searching 1, 2, 4 or 8 bits per step (SPARROW_TOPK_BITS), in 1, 2 or the default number of
    warps (SPARROW_TOPK_WARPS), stopping early or not (SPARROW_TOPK_EXIT), selects the same pages."""
    monkeypatch.setenv("SPARROW_TOPK_BITS", bits)
    monkeypatch.setenv("SPARROW_TOPK_WARPS", warps)
    monkeypatch.setenv("SPARROW_TOPK_EXIT", early)
    cfg = SparsityConfig(kv_layout="HND", scorer=scorer)
    seq = (1, 16, 17, 300, 1000, 64, 777)
    q, k, _, block_table, seq_lens = make_problem("HND", seq=seq, q_heads=4, kv_heads=2, head_dim=32, device=device)
    k[block_table[4, 10:30].long()] = k[block_table[4, 40].long()].clone()  # 20 equal summaries: ties
    k[block_table[6, :49].long()] = k[block_table[6, 0].long()].clone()  # a row of ties only
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    limit = torch.tensor([4, 1, 2, 7, 33, 100, 21], dtype=torch.int32, device=device)
    (one, two), indptr = _select_both(q, summaries, block_table, seq_lens, limit, cfg, 64, device, topk_chunk=chunk)
    for a, b in zip(one, two):  # both kernels take the lowest-index ties: bit-identical
        assert torch.equal(a, b)
    assert bool((one[3] == 0).all()), "the one-launch kernel must leave its counters at zero"
    ref = select_pages(q, summaries, block_table, seq_lens, (limit * 16).tolist(), cfg)
    got = Selection(pages=one[0][..., : ref.pages.shape[2]].long(), valid=ref.valid, n_pages=ref.n_pages)
    assert_same_up_to_ties(got, ref, reference_scores(q, summaries, block_table, seq_lens, cfg))
    want_indptr, want_indices, want_last = selection_to_csr(got, block_table, seq_lens, 16, 2)
    assert torch.equal(indptr, want_indptr) and torch.equal(one[1], want_indices) and torch.equal(one[2], want_last)
    n_pages = (seq_lens + 15) // 16
    for b, n in enumerate(n_pages.tolist()):  # entries past each row's count are zero
        assert bool((one[0][b, :, min(int(limit[b]), n):] == 0).all())
    want_tied = list(range(19)) + [47, 48]  # all tied: the sink, the lowest indices, then the two local pages
    assert one[0][6, :, :21].tolist() == [want_tied, want_tied]


@pytest.mark.gpu
@needs_triton
def test_one_launch_selection_replays_in_a_cuda_graph():
    """Counters reset inside the launch: two replays with new queries both select like the reference."""
    from bench.common import capture_graph
    from sparrow_sgl.attention.kernels.triton_select import select_pages_into

    cfg = SparsityConfig(kv_layout="HND")
    q, k, _, block_table, seq_lens = make_problem("HND", q_heads=32, kv_heads=8, dtype=torch.bfloat16, device="cuda",
                                                  seq=(5000, 300, 1000, 16, 2600))
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    limit = torch.tensor([40, 8, 30, 4, 100], dtype=torch.int32, device="cuda")
    pages = torch.empty(5, 8, 128, dtype=torch.int32, device="cuda")
    scores = torch.empty(5, 8, block_table.shape[1], device="cuda")
    counters = torch.zeros(40, dtype=torch.int32, device="cuda")
    graph = capture_graph(lambda: select_pages_into(q, block_table, seq_lens, limit, cfg, pages,
                                                    key_sum=summaries.key_sum, count=summaries.count, scores=scores,
                                                    counters=counters, pages_per_prog=32))
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert bool((counters == 0).all())
        ref = select_pages(q, summaries, block_table, seq_lens, (limit * 16).tolist(), cfg)
        got = Selection(pages=pages[..., : ref.pages.shape[2]].long(), valid=ref.valid, n_pages=ref.n_pages)
        assert_same_up_to_ties(got, ref, reference_scores(q, summaries, block_table, seq_lens, cfg))


@_kernel_test
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_matches_reference(device, layout, dtype):
    from sparrow_sgl.attention.kernels.triton_decode import triton_attend_pages

    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 dot is GPU-only in the interpreter")
    cfg = SparsityConfig(kv_layout=layout)
    q, k, v, block_table, seq_lens = make_problem(layout, dtype=dtype, device=device)
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for budget in ([48, 96, None, 32], None, 48):  # 48: 3-page lists, one split (no merge launch)
        selection = select_pages(q, summaries if budget else None, block_table, seq_lens, budget, cfg)
        ref = attend_pages(q.float(), k.float(), v.float(), block_table, seq_lens, selection, cfg)
        counts = selection.valid.sum(-1).to(torch.int32)
        out = triton_attend_pages(q, k, v, block_table, seq_lens, selection.pages.int(), counts, cfg)
        assert out.dtype == dtype and rel_err(out, ref) < tol


@_kernel_test
def test_triton_summary_update_matches_torch(device):
    from sparrow_sgl.attention.kernels.triton_summaries import append_decode

    ref = PageSummaries.allocate(12, 2, 128, device=device)
    got = PageSummaries.allocate(12, 2, 128, device=device)
    for step in range(20):
        pages = torch.tensor([step // 8, 5 + step // 8, 11], device=device)
        offsets = torch.tensor([step % 8, step % 8, step % 3], device=device)
        keys = torch.randn(3, 2, 128, device=device)
        ref.append(pages, offsets, keys)
        append_decode(got, pages, offsets, keys)
    for name in ("key_sum", "count", "key_min", "key_max"):
        assert torch.allclose(getattr(got, name).float(), getattr(ref, name).float(), atol=1e-5), name


# ---------------------------------------------------------------- FlashInfer and dispatch (GPU only)

@pytest.mark.parametrize("setting,group,expected", [("", 4, True), ("", 2, False), ("0", 4, False), ("0", 5, True),
                                                    ("1", 4, True), ("1", 8, True), ("0", 8, False)])
def test_flashinfer_tensor_core_rule(monkeypatch, setting, group, expected):
    from sparrow_sgl.attention.kernels.flashinfer_decode import TENSOR_CORES_ENV, use_tensor_cores

    monkeypatch.setenv(TENSOR_CORES_ENV, setting)
    assert use_tensor_cores(group) is expected


def test_bad_flashinfer_tensor_core_setting_is_a_clear_error(monkeypatch):
    from sparrow_sgl.attention.kernels.flashinfer_decode import TENSOR_CORES_ENV, use_tensor_cores

    monkeypatch.setenv(TENSOR_CORES_ENV, "yes")
    with pytest.raises(ValueError, match="SPARROW_FLASHINFER_TENSOR_CORES='yes': expected 0 or 1"):
        use_tensor_cores(4)


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("q_heads", [16, 32, 40])  # groups 2, 4 and 5 (5: FlashInfer's tensor-core path)
@pytest.mark.parametrize("tensor_cores", ["0", "1"])  # "1" (default): tensor cores from group 4 on (SGLang's rule)
def test_flashinfer_sparse_matches_reference(q_heads, tensor_cores, monkeypatch):
    from sparrow_sgl.attention.kernels.flashinfer_decode import TENSOR_CORES_ENV, flashinfer_attend_selection

    monkeypatch.setenv(TENSOR_CORES_ENV, tensor_cores)

    cfg = SparsityConfig(kv_layout="HND")
    q, k, v, block_table, seq_lens = make_problem("HND", q_heads=q_heads, kv_heads=8, dtype=torch.bfloat16,
                                                  device="cuda", seq=(100, 300, 17, 1000))
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    selection = select_pages(q, summaries, block_table, seq_lens, [64, 128, None, 256], cfg)
    ref = attend_pages(q.float(), k.float(), v.float(), block_table, seq_lens, selection, cfg)
    out = flashinfer_attend_selection(q, k, v, block_table, seq_lens, selection, 16)
    assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
@needs_flashinfer
@needs_triton
def test_flashinfer_decoder_with_fused_selection_in_a_cuda_graph():
    from bench.common import capture_graph
    from sparrow_sgl.attention.kernels.flashinfer_decode import FlashInferSparseDecoder
    from sparrow_sgl.attention.kernels.triton_select import select_pages_into

    cfg = SparsityConfig(kv_layout="HND")
    q, k, v, block_table, seq_lens = make_problem("HND", q_heads=32, kv_heads=8, dtype=torch.bfloat16, device="cuda",
                                                  seq=(500, 300, 1000, 640))
    summaries = PageSummaries.from_cache(k, block_table, seq_lens, cfg)
    limit = torch.full((4,), 8, dtype=torch.int32, device="cuda")
    pages = torch.empty(4, 8, 8, dtype=torch.int32, device="cuda")
    scores = torch.empty(4, 8, block_table.shape[1], device="cuda")
    decoder = FlashInferSparseDecoder(4, 8, 32, 128, 16, 8, torch.bfloat16, "cuda", use_cuda_graph=True)
    decoder.plan(limit)
    out = torch.empty_like(q)

    def step():
        select_pages_into(q, block_table, seq_lens, limit, cfg, pages, key_sum=summaries.key_sum,
                          count=summaries.count, scores=scores, csr=decoder.csr)
        decoder.run(q, k, v, out=out)

    graph = capture_graph(step)
    for _ in range(2):  # new queries: the replay must re-select
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        selection = select_pages(q, summaries, block_table, seq_lens, 128, cfg)
        ref = attend_pages(q.float(), k.float(), v.float(), block_table, seq_lens, selection, cfg)
        assert rel_err(out, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flashinfer", "triton", "torch"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_sparse_decode_on_cuda_equals_cpu_reference(backend, layout, monkeypatch):
    if backend == "flashinfer" and not HAS_FLASHINFER or backend == "triton" and not HAS_TRITON:
        pytest.skip(f"{backend} not installed")
    cfg = SparsityConfig(kv_layout=layout)
    cpu = make_problem(layout, dtype=torch.bfloat16, q_heads=16, kv_heads=4)
    gpu = [t.cuda() for t in cpu]
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    # budgets >= sink + local pages (48 tokens): below that the reference breaks ties among forced pages arbitrarily
    for budget, layer in [(48, 5), ([48, 96, None, 64], 7), (64, 0), (None, 9)]:
        sparse = budget is not None and not cfg.is_dense_layer(layer)
        if backend == "flashinfer" and sparse and layout == "NHD":
            with pytest.raises(ValueError, match="flashinfer"):
                sparse_decode(*gpu, budget, cfg, layer=layer)
            continue
        want, want_sel = sparse_decode(*[t.float() if t.is_floating_point() else t for t in cpu], budget, cfg,
                                       layer=layer, return_selection=True)
        got, got_sel = sparse_decode(*gpu, budget, cfg, layer=layer, return_selection=True)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert torch.equal(got_sel.valid.cpu(), want_sel.valid)
        assert rel_err(got, want) < 2e-2, (budget, layer)
