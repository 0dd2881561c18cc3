"""TailGuard between OpenRLHF steps (guard.py): a low tail raises the engines' budget, the state is saved each
step, and a `--ckpt.load_enable` restart resumes both the guard and the engines' schedule from it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("openrlhf")

from sparrow_sgl.mismatch import BinStat  # noqa: E402
from sparrow_sgl.openrlhf import guard  # noqa: E402
from sparrow_sgl.openrlhf.flags import SparrowFlags  # noqa: E402

pytestmark = pytest.mark.openrlhf


def _maker(out_dir, load_enable: bool):
    sparrow = SparrowFlags(schedule="fixed:512", guard=True, topk=4, tau=0.86, out_dir=str(out_dir))
    args = SimpleNamespace(sparrow=sparrow, vllm=SimpleNamespace(num_engines=2),
                           ckpt=SimpleNamespace(load_enable=load_enable))
    return SimpleNamespace(strategy=SimpleNamespace(args=args))


def _tails(*values):
    return [BinStat(i * 2048, (i + 1) * 2048, 100, v, v) for i, v in enumerate(values)]


def test_guard_raises_saves_and_resumes(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(guard, "push_schedule",
                        lambda n, spec, timeout_s: pushed.append((n, spec["budgets"])) or ["ok"] * n)

    first = _maker(tmp_path, load_enable=False)
    logs = guard.guard_step(first, _tails(0.95, 0.70))  # bin 1 below tau: raised one grid step
    assert logs["sparrow/guard_events"] >= 1 and logs["sparrow/schedule_budget_max"] > 512
    assert len(pushed) == 1 and pushed[0][0] == 2
    raised = pushed[0][1]
    assert raised[0] == 512 and raised[1] > 512
    guard.guard_step(first, _tails(0.95, 0.95))  # in the dead band / headroom: nothing moves
    assert len(pushed) == 1
    state = guard.load_state(str(tmp_path))
    assert state["step"] == 2 and state["schedule"]["budgets"] == raised

    # a restart with --ckpt.load_enable: the engines start on the saved schedule, the guard keeps its state
    sparrow = _maker(tmp_path, load_enable=True).strategy.args.sparrow
    assert guard.resumed_schedule(sparrow, load_enable=True)["budgets"] == raised
    assert guard.resumed_schedule(sparrow, load_enable=False) is None
    resumed = _maker(tmp_path, load_enable=True)
    guard.guard_step(resumed, _tails(0.95, 0.95))
    assert resumed.sparrow_step == 3 and resumed.sparrow_guard.budgets == raised
    assert resumed.sparrow_guard.streak == [s + 1 for s in first.sparrow_guard.streak]  # headroom counts go on
    fresh = _maker(tmp_path / "fresh", load_enable=True)  # nothing saved there: the flag's schedule
    guard.guard_step(fresh, _tails(0.95, 0.95))
    assert set(fresh.sparrow_guard.budgets) == {512}
