"""Unit tests of the engine's small parts: block manager, sampler filtering, sequence bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from sparrow_sgl.config import ConfigError
from sparrow_sgl.engine.block_manager import BlockManager
from sparrow_sgl.engine.sampler import filter_top_k_top_p
from sparrow_sgl.engine.scheduler import Scheduler
from sparrow_sgl.engine.sequence import Sequence, SequenceGroup


def test_block_manager_shares_full_prompt_pages():
    bm = BlockManager(num_pages=20, page_size=4)
    tables, copies = bm.allocate_group(prompt_len=10, n=3, kv_capacity=13)  # 2 shared, each owns pages 2..3
    assert bm.group_pages(10, 3, 13) == 2 + 3 * 2 == bm.num_used
    assert all(t[:2] == tables[0][:2] for t in tables)
    assert len({t[2] for t in tables}) == 3  # the partial prompt page is each sample's own ...
    assert copies == [(tables[0][2], tables[1][2]), (tables[0][2], tables[2][2])]  # ... filled by copy
    shared = tables[0][:2]
    bm.free(tables[0])
    bm.free(tables[1])
    assert bm.num_used == 2 + 2 and all(bm.ref_counts[p] == 1 for p in shared)
    bm.free(tables[2])
    assert bm.num_used == 0 and bm.peak_used == 8
    _, copies = bm.allocate_group(prompt_len=8, n=2, kv_capacity=9)  # page-aligned prompt: nothing to copy
    assert copies == []


def test_scheduler_rejects_what_never_fits():
    bm = BlockManager(num_pages=5, page_size=4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_prefill_tokens=100)
    seq = Sequence(1, list(range(30)), params=None, max_new_tokens=10)
    with pytest.raises(ConfigError, match="needs 10 KV pages but the whole pool has 5"):
        scheduler.add(SequenceGroup([seq]))
    seqs = [Sequence(i, [1, 2], params=None, max_new_tokens=2) for i in range(5)]
    with pytest.raises(ConfigError, match="max_num_seqs"):
        scheduler.add(SequenceGroup(seqs))


def test_scheduler_admits_fifo_within_limits():
    bm = BlockManager(num_pages=6, page_size=4)
    scheduler = Scheduler(bm, max_num_seqs=8, max_prefill_tokens=100)
    groups = [SequenceGroup([Sequence(i, [1] * 8, params=None, max_new_tokens=5)]) for i in range(3)]  # 3 pages each
    for group in groups:
        scheduler.add(group)
    step = scheduler.schedule()
    assert step.is_prefill and step.groups == groups[:2]
    step = scheduler.schedule()
    assert not step.is_prefill and step.seqs == [groups[0].leader, groups[1].leader]
    scheduler.finish(groups[0].leader)
    step = scheduler.schedule()
    assert step.is_prefill and step.groups == [groups[2]]


def test_top_k_top_p_filter():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)
    out = filter_top_k_top_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 0.99]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [False, False, True, True]  # top-2
    assert kept[1].tolist() == [False, False, False, True]  # the top token already holds > 0.5 of the mass
    probs = logits[2].exp()
    need = int((probs.cumsum(0) < 0.99).sum()) + 1
    assert kept[2].tolist() == [i < need for i in range(4)]
    assert torch.equal(out[kept], logits[kept])
    assert math.isclose(float(out[0].softmax(-1)[3]), float(torch.tensor([2.0, 3.0]).softmax(-1)[1]), rel_tol=1e-6)
