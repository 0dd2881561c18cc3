"""CPU thread settings from the machine's load (sparrow_sgl/threads.py); the wall-time effect is in
bench/demo_load.py, not here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparrow_sgl.threads import ENV, plan_threads


@pytest.mark.parametrize("cores, busy, threads", [(2, 0.0, 2), (2, 1.0, 1), (2, 7.5, 1), (8, 2.4, 6), (1, 0.0, 1)])
def test_threads_are_usable_cores_minus_busy_ones(monkeypatch, cores, busy, threads):
    monkeypatch.delenv(ENV, raising=False)
    assert plan_threads(cores=cores, busy=busy).threads == threads


def test_a_fixed_count_wins(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert plan_threads(cores=8, busy=7.0).threads == 3


def _child(env: dict) -> str:
    code = ("import os; from sparrow_sgl.threads import apply_process_policy; apply_process_policy(); import torch; "
            "print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "SPARROW_"))}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_policy_is_applied_before_torch_and_respects_the_user():
    assert _child({ENV: "1"}) == "PASSIVE 1"
    assert _child({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}) == "ACTIVE 1"
    assert _child({ENV: "legacy"}).startswith("None ")
