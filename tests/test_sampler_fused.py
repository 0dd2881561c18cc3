"""The one-launch Triton sampler against the torch sampler (the reference): the same tokens for the same uniforms, the
same log-probs and top-k lists up to float32 rounding, greedy ties to the first index, filtered rows on the torch
path. On CUDA (`-m gpu`) and on CPU through Triton's interpreter (SPARROW_TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICES, needs_triton  # noqa: I001 - sets the interpreter flag before kernels import

from sparrow_sgl.engine.sampler import Sampler, fused_applies
from sparrow_sgl.engine.sampling_params import SamplingParams
from sparrow_sgl.engine.sequence import Sequence

pytestmark = needs_triton
VOCAB = 5003  # two 4096-wide blocks, the last one partly masked


def _seqs(specs: list[dict], seed: int = 0) -> list[Sequence]:
    """One sequence per spec (SamplingParams fields), each with its own seeded generator."""
    return [Sequence(i, [1, 2], SamplingParams(**spec), 8, 0, generator=torch.Generator().manual_seed(seed + i))
            for i, spec in enumerate(specs)]


def _both(logits: torch.Tensor, specs: list[dict]):
    fused = Sampler(fused=True)(logits, _seqs(specs))
    reference = Sampler(fused=False)(logits.cpu(), _seqs(specs))
    return fused, reference


SPECS = [
    {"temperature": 1.0, "logprobs_topk": 5},
    {"temperature": 0.7, "logprobs_topk": 0},
    {"temperature": 1.3, "logprobs_topk": 3},
    {"temperature": 0.0, "logprobs_topk": 4},  # greedy
    {"temperature": 1.0, "logprobs_topk": 5},
    {"temperature": 0.5, "logprobs_topk": 1},
]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sampler_draws_the_reference_tokens_and_log_probs(device):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(len(SPECS), VOCAB, generator=g) * 4).to(device)
    fused, ref = _both(logits, SPECS)
    assert fused.token_ids == ref.token_ids
    assert fused.logprobs == pytest.approx(ref.logprobs, abs=2e-5)
    assert fused.topk_ids == ref.topk_ids
    for got, want in zip(fused.topk_logprobs, ref.topk_logprobs):
        assert got == pytest.approx(want, abs=2e-5)


def _check_inverse_cdf(logits: torch.Tensor, tokens: list[int], seed: int, rel_tol: float = 1e-5) -> None:
    """Each token is the first whose cumulative probability reaches u x total (float64), up to float32 rounding:
    the cumulative mass before it is below the target and through it at or above, within rel_tol of the total."""
    for i, (row, token) in enumerate(zip(logits.double(), tokens)):
        g = torch.Generator().manual_seed(seed + i)
        u = float(torch.tensor(1.0 - float(torch.rand((), generator=g)), dtype=torch.float32))  # staged as float32
        cdf = row.softmax(-1).cumsum(-1)
        target, tol = u * float(cdf[-1]), rel_tol * float(cdf[-1])
        before = float(cdf[token - 1]) if token else 0.0
        assert before <= target + tol and float(cdf[token]) >= target - tol, (i, token, before, target)


@pytest.mark.parametrize("device", DEVICES)
def test_many_draws_follow_the_inverse_cdf(device):
    """Flat and peaked rows, 8 draws each, against the float64 rule. On flat rows a draw may land one token over
    when u x total falls within float32 rounding of a boundary (the torch sampler's float32 cumsum drifts as much)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, VOCAB, generator=g)
    logits[:4] *= 12  # peaked: most mass in a few tokens, near-zero probabilities elsewhere
    specs = [{"temperature": 1.0}] * 8
    for seed in range(0, 800, 100):
        fused = Sampler(fused=True)(logits.to(device), _seqs(specs, seed))
        _check_inverse_cdf(logits, fused.token_ids, seed)
        peaked = Sampler(fused=False)(logits, _seqs(specs, seed))
        assert fused.token_ids[:4] == peaked.token_ids[:4]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_ties_take_the_first_index_across_blocks(device):
    logits = torch.zeros(2, VOCAB)
    logits[0, [4500, 17, 4999]] = 3.0  # the first maximum is in the first block
    logits[1, [4200, 4201]] = 2.0  # both in the second block
    fused, ref = _both(logits.to(device), [{"temperature": 0.0}, {"temperature": 0.0}])
    assert fused.token_ids == ref.token_ids == [17, 4200]
    assert fused.logprobs == pytest.approx(ref.logprobs, abs=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_with_top_k_or_top_p_take_the_torch_path(device):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, VOCAB, generator=g).to(device)
    specs = [{"temperature": 1.0, "top_k": 20}, {"temperature": 1.0, "top_p": 0.9}, {"temperature": 1.0}]
    fused, ref = _both(logits, specs)
    assert fused.token_ids == ref.token_ids and fused.logprobs == pytest.approx(ref.logprobs, abs=1e-6)
    assert not fused_applies(logits, _seqs(specs)) and not fused_applies(logits.cpu(), _seqs(specs[2:]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_rows_split_into_chunks_draw_what_one_program_draws(device, chunks):
    """Several programs per row (the last to arrive combines them in chunk order and draws): the same tokens as one
    program per row and as the torch sampler, log-probs equal up to float32 rounding; greedy ties across chunks go
    to the first index; a row whose mass sits in a late chunk, and uniforms of 1 (the draw reaching the row's end)."""
    from sparrow_sgl.attention.kernels.triton_sample import sample

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, VOCAB, generator=g) * 3
    logits[3] = 0.0
    logits[3, [4900, 1200, 3000]] = 5.0  # greedy: the first maximum is in an early chunk
    logits[4, :4000] = -30.0  # nearly all mass at the end of the row
    inv_t = torch.tensor([1.0, 0.7, 1.5, 1.0, 1.0, 1.0])
    uniform = torch.tensor([0.3, 0.999, 0.05, 1.0, 0.5, 1.0])
    greedy = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    args = [t.to(device) for t in (logits, inv_t, uniform, greedy)]
    one = sample(*args, block=1024, chunks=1)
    split = sample(*args, block=1024, chunks=chunks)
    assert split[0].tolist() == one[0].tolist()
    assert split[0][3].item() == 1200
    torch.testing.assert_close(split[1], one[1], atol=2e-5, rtol=0)
    torch.testing.assert_close(split[2], one[2], atol=2e-5, rtol=0)
    ref = torch.log_softmax(logits * inv_t[:, None], dim=-1)
    torch.testing.assert_close(split[1].cpu(), ref.gather(1, split[0].cpu()[:, None])[:, 0], atol=2e-5, rtol=0)
    again = sample(*args, block=1024, chunks=chunks)  # the row counters were left at zero
    assert again[0].tolist() == split[0].tolist() and torch.equal(again[1], split[1])


def test_the_kernel_refuses_wrong_shapes():
    from sparrow_sgl.attention.kernels.triton_sample import sample

    logits = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="contiguous rows"):
        sample(logits.t(), torch.ones(8), torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"uniform must be \[2\]"):
        sample(logits, torch.ones(2), torch.ones(3), torch.zeros(2))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "eager"])
@pytest.mark.parametrize("schedule", ["dense", "fixed:64"])
def test_engine_generates_the_same_tokens_with_either_sampler(tiny_model_dir, monkeypatch, mode, schedule):
    """The engine on CUDA: sampling inside the decode graph (the default), and SPARROW_FUSED_SAMPLER=0 (torch,
    outside the graph) give the same rollouts; a top-k-filtered batch takes the torch path either way."""
    from sparrow_sgl.config import EngineConfig
    from sparrow_sgl.engine import Engine

    monkeypatch.setenv("SPARROW_GPU_DECODE", mode)
    engine = Engine(EngineConfig(model=str(tiny_model_dir), device="cuda", max_model_len=256, kv_gb=0.25))
    prompts = [[5, 9, 13, 21], list(range(10, 160))]  # 150 tokens: fixed:64 selects pages
    params = SamplingParams(temperature=1.0, max_new_tokens=40, seed=7, ignore_eos=True, logprobs_topk=3, n=3)
    filtered = SamplingParams(temperature=0.8, top_k=5, max_new_tokens=12, seed=3, ignore_eos=True)
    fused = engine.generate(prompts, params, schedule, progress=False)
    fused_filtered = engine.generate(prompts, filtered, schedule, progress=False)
    if mode == "graph":
        assert any(key.sample_topk == 3 for key in engine.runner.gpu_decoder().steps)  # sampled in the graph
    monkeypatch.setenv("SPARROW_FUSED_SAMPLER", "0")
    ref = engine.generate(prompts, params, schedule, progress=False)
    assert [r.token_ids for r in fused] == [r.token_ids for r in ref]
    assert [r.topk_ids for r in fused] == [r.topk_ids for r in ref]
    for a, b in zip(fused, ref):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.meta["kv_tokens_mean"] == pytest.approx(b.meta["kv_tokens_mean"])
    ref_filtered = engine.generate(prompts, filtered, schedule, progress=False)
    assert [r.token_ids for r in fused_filtered] == [r.token_ids for r in ref_filtered]


@pytest.mark.parametrize("device", DEVICES)
def test_one_sampler_serves_calls_inside_and_outside_inference_mode(device):
    logits = torch.randn(2, VOCAB).to(device)
    sampler = Sampler(fused=True)
    with torch.inference_mode():
        first = sampler(logits, _seqs([{"temperature": 1.0}] * 2))
    assert sampler(logits, _seqs([{"temperature": 1.0}] * 2)).token_ids == first.token_ids  # same seeds


@pytest.mark.parametrize("device", DEVICES)
def test_packed_rows_put_extra_columns_between_the_log_prob_and_the_top_k(device):
    """The layout the decode graph packs (token, log-prob, attended KV tokens, top-k ids, top-k log-probs)."""
    from sparrow_sgl.attention.kernels.triton_sample import sample, sample_packed

    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5)).to(device)
    inv_t, u, greedy = (torch.tensor(v, device=device) for v in ([1.0, 2.0, 1.0], [0.3, 0.9, 1.0], [0.0, 0.0, 1.0]))
    extra = torch.tensor([7.0, 8.0, 9.0], device=device)
    packed = sample_packed(logits, inv_t, u, greedy, 4, extra=(extra,)).cpu()
    token, chosen, lse = sample(logits, inv_t, u, greedy)
    assert packed.shape == (3, 3 + 2 * 4) and packed.dtype == torch.float64
    assert packed[:, 0].long().tolist() == token.cpu().tolist() and packed[:, 2].tolist() == [7.0, 8.0, 9.0]
    assert packed[:, 3:7].long().tolist() == logits.topk(4, dim=-1).indices.cpu().tolist()
    want = logits.topk(4, dim=-1).values * inv_t[:, None] - lse[:, None]
    torch.testing.assert_close(packed[:, 7:].float(), want.cpu(), atol=1e-6, rtol=0)
    torch.testing.assert_close(packed[:, 1].float(), chosen.cpu(), atol=0, rtol=0)
