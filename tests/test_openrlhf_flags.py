"""`--sparrow.*` / `--sglang.*` flags: parsing, checks against OpenRLHF's flags, and the entry point's dry run."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("openrlhf")

from openrlhf_helpers import grpo_args, run_entry  # noqa: E402

from sparrow_sgl.config import ConfigError  # noqa: E402
from sparrow_sgl.openrlhf import flags  # noqa: E402

pytestmark = [pytest.mark.openrlhf, pytest.mark.timeout(300)]


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--vllm.num_engines", type=int, default=None)
    p.add_argument("--vllm.tensor_parallel_size", type=int, default=1)
    p.add_argument("--vllm.sync_with_ray", action="store_true")
    p.add_argument("--ds.lora.rank", type=int, default=0)
    p.add_argument("--ds.zero_stage", type=int, default=2)
    p.add_argument("--algo.advantage.is_correction_level", default="off")
    flags.add_flags(p)
    return p.parse_args(list(argv))


def test_defaults_and_nested_distill_flags():
    ns = _parse("--vllm.num_engines", "2", "--sparrow.schedule", "qwen3-4b-0.86", "--sparrow.topk", "20",
                "--sparrow.distill.enabled", "--sparrow.distill.rank", "8", "--sparrow.distill.replan_every", "0",
                "--algo.advantage.is_correction_level", "token", "--sglang.kv_tokens", "4096", "--sparrow.dry_run")
    sparrow, sgl = flags.check(ns)
    assert sparrow.engine == "sglang" and sparrow.topk == 20 and sparrow.guard is False
    assert sparrow.distill.enabled and sparrow.distill.rank == 8 and sparrow.distill.replan_every == 0
    assert sgl.kv_tokens == 4096
    sections = flags.to_dict(sparrow, sgl)  # how they travel to the engine actors
    assert flags.from_dicts(sections["sparrow"], sections["sglang"]) == (sparrow, sgl)


@pytest.mark.parametrize(
    "argv, reason",
    [
        ((), "--vllm.num_engines >= 1"),
        (("--vllm.num_engines", "1", "--sparrow.engine", "embedded", "--sglang.kv_tokens", "64"), "--sglang.kv_tokens"),
        (("--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "2", "--sparrow.engine", "embedded"),
         "tensor_parallel_size 1"),
        (("--vllm.num_engines", "1", "--vllm.sync_with_ray"), "sync_with_ray"),
        (("--vllm.num_engines", "2", "--sglang.url", "http://a:1"), "1 servers for 2 engines"),
        (("--vllm.num_engines", "1", "--sparrow.guard", "--sparrow.topk", "20"), "sparse --sparrow.schedule"),
        (("--vllm.num_engines", "1", "--sparrow.schedule", "fixed:512", "--sparrow.guard"), "topk >= 1"),
        (("--vllm.num_engines", "1", "--sparrow.schedule", "nope"), "unknown schedule"),
        (("--vllm.num_engines", "1", "--sparrow.topk", "21"), "topk must lie"),
        (("--vllm.num_engines", "1", "--sparrow.schedule", "fixed:512", "--sparrow.distill.enabled",
          "--ds.lora.rank", "8"), "rollout-only LoRA"),
        (("--vllm.num_engines", "1", "--sparrow.schedule", "fixed:512", "--sparrow.distill.enabled"),
         "is_correction_level token"),
        (("--vllm.num_engines", "1", "--sparrow.schedule", "fixed:512", "--sparrow.distill.enabled",
          "--algo.advantage.is_correction_level", "token", "--sparrow.distill.kl_mode", "forward"), "only k3"),
        (("--vllm.num_engines", "1", "--sparrow.schedule", "fixed:512", "--sparrow.distill.enabled",
          "--algo.advantage.is_correction_level", "token", "--ds.zero_stage", "3"), "zero_stage <= 2"),
        (("--vllm.num_engines", "1", "--sparrow.schedule", "fixed:512", "--sparrow.distill.enabled", "--sparrow.topk",
          "4", "--sparrow.guard", "--algo.advantage.is_correction_level", "token"), "re-planner"),
        (("--vllm.num_engines", "1", "--sparrow.schedule", "fixed:512", "--sparrow.distill.enabled",
          "--algo.advantage.is_correction_level", "token"), "replan_every 0 with SGLang"),
    ],
)
def test_conflicts_are_refused(argv, reason):
    with pytest.raises(ConfigError, match=reason.replace("(", r"\(")):
        flags.check(_parse(*argv))


def test_entry_point_dry_run_and_refusals(tiny_model_dir, tmp_path):
    """One process each: the dry run prints OpenRLHF's validated args with our sections; a conflicting and an
    unknown flag exit 2 before Ray starts (no `Started a local Ray instance`)."""
    args = grpo_args(tiny_model_dir, tmp_path, "--sparrow.engine", "embedded", "--sparrow.schedule", "fixed:512",
                     "--sparrow.topk", "4", "--sparrow.dry_run")
    done = run_entry(args, tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads(done.stdout[done.stdout.index("{"):])
    assert config["sparrow"]["engine"] == "embedded" and config["sparrow"]["topk"] == 4
    assert config["sparrow"]["out_dir"] == str(tmp_path / "out" / "sparrow")
    assert config["reward"]["remote_url"] == [str(tmp_path / "reward.py")]  # OpenRLHF's own validation ran
    assert config["rollout"]["vllm_generate_batch_size"] == 2
    assert "Started a local Ray" not in done.stdout + done.stderr

    bad = run_entry(args[:-1] + ["--sglang.kv_tokens", "64"], tmp_path, timeout=240)
    assert bad.returncode == 2 and "--sglang.kv_tokens needs --sparrow.engine sglang" in bad.stderr
    assert "Started a local Ray" not in bad.stdout + bad.stderr
