import json
from dataclasses import dataclass

import pytest
import torch

from sparrow_sgl.calibrate import CalibrationTable, calibrate, load_prompts, paper_budget_grid, plot_table
from sparrow_sgl.cli import main
from sparrow_sgl.config import ConfigError, Schedule
from sparrow_sgl.plan import plan_schedule
from sparrow_sgl.rollout import Rollout

VOCAB = 24


@dataclass
class FakeScore:
    logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    full_logprobs: torch.Tensor | None = None


class FakeEngine:
    """Engine-neutral stand-in: the sparse distribution drifts from the dense one with position / budget."""

    def __init__(self):
        self.generated_with: list[list[int | None]] = []

    @staticmethod
    def logp(positions: torch.Tensor, budget: int | None) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(4096, VOCAB, generator=g)[positions]
        noise = torch.randn(4096, VOCAB, generator=g)[positions]
        drift = 0.0 if budget is None else (positions[:, None].float() / budget) * 0.4
        return torch.log_softmax(base + drift * noise, -1)

    def generate(self, prompts, params, schedule=None, progress=True):
        self.generated_with.append(list(schedule.budgets))
        out = []
        for j, prompt in enumerate(prompts):
            for i in range(params.n):
                pos = torch.arange(len(prompt), len(prompt) + params.max_new_tokens)
                logp = self.logp(pos, schedule.budgets[0])
                ids = torch.multinomial(logp.exp(), 1, generator=torch.Generator().manual_seed(j * 10 + i))[:, 0]
                top = logp.topk(params.logprobs_topk) if params.logprobs_topk else None
                chosen = logp.gather(1, ids[:, None])[:, 0].tolist()
                out.append(Rollout(
                    prompt_ids=list(prompt), token_ids=ids.tolist(), logprobs=chosen,
                    topk_ids=top.indices.tolist() if top else None, topk_logprobs=top.values.tolist() if top else None,
                    prompt_index=j, sample_index=i,
                ))  # fmt: skip
        return out

    def score(self, prompt_ids, response_ids, sparse=None, topk=0, return_full=False, temperature=1.0):
        results = []
        for p, r in zip(prompt_ids, response_ids):
            pos = torch.arange(len(p), len(p) + len(r))
            budget = None if sparse is None else sparse.budgets[0]
            logp = self.logp(pos, budget)
            top = logp.topk(topk) if topk else None
            chosen = logp.gather(1, torch.tensor(r)[:, None])[:, 0]
            results.append(FakeScore(chosen, top.indices if top else None, top.values if top else None,
                                     logp if return_full else None))  # fmt: skip
        return results


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8]]


def test_calibrate_writes_a_table_per_budget_and_resumes(tmp_path):
    out = tmp_path / "calib.json"
    engine = FakeEngine()
    kw = dict(samples=2, max_new_tokens=120, bin_tokens=32, sparsity={"page_size": 16}, progress=False)
    calibrate(engine, PROMPTS, [256, 64], out=out, noise_floor=True, **kw)
    assert engine.generated_with == [[64], [256], [None]]  # ascending, noise floor last
    saved = CalibrationTable.load(out)
    assert saved.budget_values() == [64, 256] and saved.has(None)
    assert json.loads(out.read_text())["budgets"]["64"][0].keys() == {"start", "end", "count", "tail", "mean"}
    n_bins = -(-(5 + 120) // 32)
    assert all(len(saved.stats(b)) == n_bins for b in (64, 256, None))
    assert sum(s.count for s in saved.stats(64)) == 2 * 2 * 120
    # tails fall with position and rise with the budget; the dense engine against itself is exact
    t64, t256 = [s.tail for s in saved.stats(64)], [s.tail for s in saved.stats(256)]
    assert t64[-1] < t64[0] and all(a <= b + 1e-6 for a, b in zip(t64, t256))
    assert all(s.tail == pytest.approx(1.0) for s in saved.stats(None))
    assert not out.with_suffix(".json.tmp").exists()
    # resume: finished budgets are skipped
    engine.generated_with.clear()
    calibrate(engine, PROMPTS, [64, 128, 256], table=saved, out=out, noise_floor=True, **kw)
    assert engine.generated_with == [[128]]
    assert CalibrationTable.load(out).budget_values() == [64, 128, 256]
    # the planner reads it
    plan = plan_schedule(CalibrationTable.load(out), tau=0.9, min_count=10)
    assert plan.schedule.bin_tokens == 32 and plan.schedule.budgets == sorted(
        plan.schedule.budgets, key=lambda b: b or 1e9
    )


def test_topk_mode_is_a_lower_bound_of_full_mode(tmp_path):
    kw = dict(samples=2, max_new_tokens=100, bin_tokens=50, sparsity={"page_size": 16}, progress=False)
    full = calibrate(FakeEngine(), PROMPTS, [64], mode="full", **kw)
    topk = calibrate(FakeEngine(), PROMPTS, [64], mode="topk", topk=5, **kw)
    assert topk.mode == "topk"
    for f, t in zip(full.stats(64), topk.stats(64)):
        assert t.count == f.count and t.tail <= f.tail + 1e-6


def test_plot_table_writes_a_png(tmp_path):
    table = calibrate(FakeEngine(), PROMPTS, [64, 128], samples=1, max_new_tokens=60, bin_tokens=20,
                      sparsity={"page_size": 16}, noise_floor=True, progress=False)  # fmt: skip
    path = plot_table(table, tmp_path / "plot" / "tails.png", tau=0.86)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_load_prompts_from_jsonl_and_datasets_dir(tmp_path):
    from datasets import Dataset

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [{"problem": "1+1?"}, {"problem": "2+2?"}, "raw text"]))
    assert load_prompts(jsonl) == ["1+1?", "2+2?", "raw text"]
    assert load_prompts(jsonl, limit=1) == ["1+1?"]
    Dataset.from_dict({"question": ["a", "b", "c"], "answer": ["1", "2", "3"]}).save_to_disk(tmp_path / "ds")
    assert load_prompts(tmp_path / "ds", limit=2) == ["a", "b"]
    with pytest.raises(ConfigError, match="no prompt field"):
        load_prompts(tmp_path / "ds", field_name="missing")
    with pytest.raises(ConfigError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")


def test_default_grid_is_the_paper_presets_budgets():
    grid = paper_budget_grid()
    assert grid[0] == 512 and grid[-1] == 18432 and 8192 in grid and grid == sorted(set(grid))
    assert all(Schedule.fixed(b).budgets == [b] for b in grid)


def test_calibrate_cli_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("sparrow_sgl.engine.engine")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "what is 2 + 3?"}) + "\n")
    out = tmp_path / "calib.json"
    args = [
        "calibrate",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(prompts),
        "--budgets",
        "48,64",
        "--samples",
        "2",
        "--max-new-tokens",
        "40",
        "--ignore-eos",
        "--bin-tokens",
        "32",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    table = CalibrationTable.load(out)
    assert table.budget_values() == [48, 64] and table.mode == "full" and table.bin_tokens == 32
    for budget in (48, 64):
        stats = table.stats(budget)
        assert sum(s.count for s in stats) == 2 * 40
        assert all(0.0 <= s.tail <= 1.0 for s in stats if s.tail is not None)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "48 tok" in text and "wrote" in text
    # a rerun resumes without regenerating; different settings are refused
    assert main(args) == 0 and "already measured" in capsys.readouterr().out
    assert main([*args[:-2], "--samples", "3", "--out", str(out)]) == 2


class VocabEngine(FakeEngine):
    """FakeEngine with an hf_config, so calibrate can size full mode; records each score call's response count."""

    def __init__(self, vocab: int = VOCAB):
        super().__init__()
        self.hf_config = type("Config", (), {"vocab_size": vocab})()
        self.scored: list[int] = []

    def score(self, prompt_ids, response_ids, **kwargs):
        self.scored.append(len(response_ids))
        return super().score(prompt_ids, response_ids, **kwargs)


def test_score_chunks_respect_count_and_bytes():
    from sparrow_sgl.calibrate import score_chunks

    assert score_chunks([10, 10, 10, 50, 5], 4) == [[0, 1, 2, 3], [4]]
    assert score_chunks([10, 10, 10, 50, 5], 4, bytes_per_token=1, max_bytes=25) == [[0, 1], [2], [3], [4]]
    assert score_chunks([], 4) == []


def test_full_mode_refuses_a_response_over_the_memory_cap_before_generating():
    engine = VocabEngine(vocab=151_936)  # a real Qwen3 vocabulary
    with pytest.raises(ConfigError, match=r"full-vocabulary mode would hold 9\.3 GiB.*--mode topk"):
        calibrate(engine, PROMPTS, [64], max_new_tokens=8192, full_max_gib=4.0, progress=False)
    assert engine.generated_with == []  # nothing generated, nothing lost
    with pytest.raises(ConfigError, match="full_max_gib must be > 0"):
        calibrate(engine, PROMPTS, [64], max_new_tokens=8, full_max_gib=0, progress=False)
    calibrate(VocabEngine(vocab=151_936), PROMPTS, [64], mode="topk", max_new_tokens=8, progress=False)


def test_full_mode_scores_in_chunks_under_the_cap_with_the_same_table(tmp_path):
    kw = dict(samples=2, max_new_tokens=40, bin_tokens=16, sparsity={"page_size": 16}, progress=False)
    wide, tight = VocabEngine(), VocabEngine()
    one = calibrate(wide, PROMPTS, [48], **kw)
    cap = 2 * 4 * 40 * VOCAB / 2**30  # exactly one response's dense + sparse log-probs
    two = calibrate(tight, PROMPTS, [48], full_max_gib=cap, **kw)
    assert wide.scored == [4, 4] and tight.scored == [1] * 8  # (dense + sparse) per chunk
    assert [s.tail for s in one.stats(48)] == [s.tail for s in two.stats(48)]
