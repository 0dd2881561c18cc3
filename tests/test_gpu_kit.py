"""Issue 20's GPU kit and colocated-run scripts, on the CPU: the split / join / sha256 logic of the wheel kit (fake
wheels, no network), the task's reward, the results summary, the DeepSpeed torch-Adam start-up hook, that the image's
packages plus the kit cover every import of the run, and the run script's DRY_RUN."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
LIB = SCRIPTS / "gpu_kit_lib.sh"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {LIB}; {script}"], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def _fake_kit(tmp: Path) -> dict[str, bytes]:
    src = tmp / "src"
    src.mkdir()
    files = {"big-1.0-cp312-cp312-manylinux2014_x86_64.whl": os.urandom(2500),
             "small-2.0-py3-none-any.whl": os.urandom(300), "mid-0.1-py3-none-any.whl": os.urandom(900)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    return files


def test_scripts_parse():
    for name in ("gpu_kit.sh", "gpu_kit_lib.sh", "gpu_colocated_run.sh"):
        subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True)


def test_split_then_join_gives_back_every_wheel(tmp_path):
    files = _fake_kit(tmp_path)
    assert _bash("kit_split src a b 1000", tmp_path).returncode == 0
    a, b = tmp_path / "a", tmp_path / "b"
    pieces = [p for d in (a, b) for p in d.iterdir() if p.name != "kit.sha256"]
    assert max(p.stat().st_size for p in pieces) <= 1000
    assert sorted(p.name for p in pieces if ".part-" in p.name) == [
        f"big-1.0-cp312-cp312-manylinux2014_x86_64.whl.part-a{c}" for c in "abc"]
    assert (a / "kit.sha256").read_text() == (b / "kit.sha256").read_text()
    sizes = [sum(p.stat().st_size for p in d.iterdir() if p.name != "kit.sha256") for d in (a, b)]
    assert abs(sizes[0] - sizes[1]) <= 1000  # both calls carry about the same
    done = _bash("kit_join out a b", tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert {p.name: p.read_bytes() for p in out.glob("*.whl")} == files
    assert not list(out.glob("*.part-*"))


def test_join_refuses_a_damaged_or_missing_piece(tmp_path):
    _fake_kit(tmp_path)
    assert _bash("kit_split src a b 1000", tmp_path).returncode == 0
    part = next(p for d in ("a", "b") for p in (tmp_path / d).glob("*.part-ab"))
    data = bytearray(part.read_bytes())
    data[0] ^= 0xFF
    part.write_bytes(bytes(data))
    done = _bash("kit_join out a b", tmp_path)
    assert done.returncode != 0 and "does not match kit.sha256" in done.stderr
    part.unlink()
    assert _bash("kit_join out a b", tmp_path).returncode != 0
    done = _bash("kit_join out a missing", tmp_path)
    assert done.returncode != 0 and "carry missing" in done.stderr


def test_join_refuses_folders_of_two_kits(tmp_path):
    _fake_kit(tmp_path)
    assert _bash("kit_split src a b 1000 && echo x > src/extra-1-py3-none-any.whl && kit_split src c d 1000",
                 tmp_path).returncode == 0
    done = _bash("kit_join out a d", tmp_path)
    assert done.returncode != 0 and "different kits" in done.stderr


def test_reward_scores_the_chain_after_the_thinking_block():
    task = _load("gpu_colocated_task")
    label = "x21 = x10 = x16 = 1"
    prompt = "x21 = x10 ; x3 = 4 . find x21 <|im_end|> <|im_start|> assistant <think> </think> "
    queries = [prompt + "x21 = x10 = x16 = 1 <|im_end|>", prompt + "x21 = x10 = x9 = 1 <|im_end|>",
               prompt + "la la <|im_end|>"]
    out = task.reward_func(queries, [prompt] * 3, [label] * 3)
    assert out["rewards"].tolist() == [1.0, 0.5, 0.0]
    assert out["extra_logs"]["reward_error"].tolist() == [0.0, 0.0, 0.0]
    assert out["extra_logs"]["reward_ms"].shape == (3,)
    broken = task.reward_func([None], [prompt], [label])  # never raises
    assert broken["rewards"].tolist() == [0.0] and broken["extra_logs"]["reward_error"].tolist() == [1.0]


def test_prompts_are_rendered_as_the_testbed_trained(tmp_path):
    task = _load("gpu_colocated_task")
    from transformers import AutoTokenizer

    from sparrow_sgl.rl.tasks import ChainTask, encode_prompt
    from sparrow_sgl.testbed import SWEEP_TASKS

    model = ROOT / "bench/results/testbed/sweep2/model"
    task.write_prompts(str(model), str(tmp_path / "p.jsonl"), 2)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model)
    sample = ChainTask(**SWEEP_TASKS["long"][0]).sample(1)
    ids = tokenizer(rows[1]["prompt"], add_special_tokens=False)["input_ids"]
    assert ids == encode_prompt(tokenizer, sample.prompt)
    assert rows[1]["label"] == sample.reference


def _step_line(step: int, gen: float, samples: int, length: float) -> str:
    status = {"timing/generation": gen, "timing/make_experience": 1.0, "timing/ppo_train": 2.0,
              "timing/broadcast": 0.5, "timing/step_total": gen + 3.5, "rollout/num_samples": float(samples),
              "rollout/response_length_mean": length, "rollout/reward_mean": 0.25, "reward_ms": 2.0,
              "sparrow/tail_bin_0": 0.9, "sparrow/tail_min": float("nan")}
    return f"(PPOTrainer pid=1) INFO ppo_trainer.py:550] ✨ Global step {step}: {status!r}\n"


def test_summary_from_the_run_logs(tmp_path):
    summary = _load("gpu_colocated_summary")
    (tmp_path / "settings.json").write_text(json.dumps({"steps": 3}))
    (tmp_path / "gpu.txt").write_text("NVIDIA H200, 143771 MiB\n")
    for mode, gen in (("dense", 4.0), ("sparse", 2.0)):
        d = tmp_path / mode
        (d / "sparrow").mkdir(parents=True)
        (d / "rc").write_text("0\n")
        (d / "wall.json").write_text('{"seconds": 100}')
        (d / "run.log").write_text("".join(_step_line(s, gen * (3 if s == 1 else 1), 64, 10.0) for s in (1, 2, 3)))
        events = [{"t": 1.0, "call": "generate_responses"}, {"t": 2.0, "call": "update_weight_cuda_ipc"},
                  {"t": 2.5, "call": "update_weight_cuda_ipc"}, {"t": 3.0, "call": "wake_up"}]
        (d / "sparrow" / "engine_0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    result = summary.summarize(tmp_path)
    assert result["gpu"].startswith("NVIDIA H200")
    dense = result["runs"]["dense"]
    assert dense["steps"] == 3 and dense["exit_code"] == 0
    assert dense["mean_after_step_1"]["rollout_tokens_per_s"] == 160.0  # 64 x 10 tokens / 4 s, steps 2-3
    assert dense["per_step"][0]["reward_s"] == pytest.approx(0.128) and dense["per_step"][0]["train_s"] == 3.0
    assert dense["per_step"][1]["tails"] == {"tail_bin_0": 0.9}
    assert dense["engine_ipc_syncs"] == [{"tensors": 2, "calls": 2, "first_to_last_s": 0.5}]
    assert dense["trainer_syncs"] == []
    assert result["rollout_speedup_sparse_vs_dense"] == 2.0
    assert result["sync_s"] == {"dense": 0.5, "sparse": 0.5}


def test_torch_adam_hook_replaces_fused_adam():
    pytest.importorskip("deepspeed")
    code = ("import sys, deepspeed.runtime.engine as e; assert 'sitecustomize' in sys.modules; "
            "print(e.DeepSpeedEngine.get_optimizer_configuration(None, {'lr': 1e-3}, True)[0].__name__)")
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS / "gpu_site")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "AdamW"


@pytest.mark.openrlhf
@pytest.mark.timeout(600)
def test_image_packages_plus_kit_cover_every_import(tmp_path):
    pytest.importorskip("openrlhf")
    check = [sys.executable, str(SCRIPTS / "gpu_kit_check.py")]
    done = subprocess.run(check, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and "IMPORT_CHECK ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    kit = tmp_path / "kit.txt"
    kit.write_text("".join(line + "\n" for line in (SCRIPTS / "gpu_kit.txt").read_text().splitlines()
                           if not line.startswith("pylatexenc")))
    done = subprocess.run([*check, "--kit", str(kit)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1 and "No module named 'pylatexenc'" in done.stdout


def _dry_run(tmp_path, **env) -> subprocess.CompletedProcess:
    tmp_path.mkdir(exist_ok=True)
    _fake_kit(tmp_path)
    assert _bash("kit_split src a b 1000", tmp_path).returncode == 0
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), "KIT_DIRS": f"{tmp_path / 'a'} {tmp_path / 'b'}", **env}
    return subprocess.run(["bash", str(SCRIPTS / "gpu_colocated_run.sh"), "run"], env=env, capture_output=True,
                          text=True, timeout=500)


def _resolved(tmp_path, mode: str) -> dict:
    text = (tmp_path / "work" / mode / "dry_run.json").read_text()
    return json.loads(text[text.index("{\n"):])


@pytest.mark.openrlhf
@pytest.mark.timeout(600)
def test_dry_run_checks_the_kit_and_resolves_both_modes(tmp_path):
    pytest.importorskip("openrlhf")
    done = _dry_run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kit: 3 wheels joined and checked against kit.sha256" in done.stdout
    for mode, schedule in (("dense", "dense"), ("sparse", "fixed:1024")):
        config = _resolved(tmp_path, mode)
        assert config["train"]["colocate_all"] and config["vllm"]["enable_sleep"]
        assert config["vllm"]["sync_backend"] == "nccl" and config["ds"]["attn_implementation"] == "sdpa"
        assert config["sparrow"]["engine"] == "embedded" and config["sparrow"]["schedule"] == schedule
        assert config["sparrow"]["topk"] == 20
    assert len((tmp_path / "work" / "prompts.jsonl").read_text().splitlines()) == 32


@pytest.mark.openrlhf
@pytest.mark.timeout(600)
def test_split_layout_trains_on_one_gpu_and_rolls_out_on_the_others(tmp_path):
    """Issue 20's several-GPU run, prepared: LAYOUT=split GPUS=4 resolves to 3 rollout engines, no colocation or
    sleep, the NCCL weight broadcast, a 0.86 preset; fewer than 2 GPUs is refused before anything runs."""
    pytest.importorskip("openrlhf")
    done = _dry_run(tmp_path, LAYOUT="split", GPUS="4", MODES="sparse", SPARSE_SCHEDULE="qwen3-1.7b-0.86")
    assert done.returncode == 0, done.stderr[-3000:]
    config = _resolved(tmp_path, "sparse")
    assert not config["train"]["colocate_all"] and not config["vllm"]["enable_sleep"]
    assert config["vllm"]["num_engines"] == 3 and config["vllm"]["sync_backend"] == "nccl"
    assert config["sparrow"]["schedule"] == "qwen3-1.7b-0.86"
    settings = json.loads((tmp_path / "work" / "settings.json").read_text())
    assert settings["layout"] == "split" and settings["gpus"] == 4
    refused = _dry_run(tmp_path / "one", LAYOUT="split", GPUS="1")
    assert refused.returncode == 2 and "needs 2 or more GPUs" in refused.stderr


@pytest.mark.openrlhf
@pytest.mark.timeout(600)
def test_each_mode_ends_before_the_device_calls_limit(tmp_path):
    """CALL_LIMIT_S cuts each mode's timeout so the summary is written 30 s before the call is killed (twice a cut
    call brought nothing back); a mode left with under 60 s is skipped."""
    pytest.importorskip("openrlhf")
    done = _dry_run(tmp_path, MODES="dense", RUN_TIMEOUT="420", CALL_LIMIT_S="150")
    assert done.returncode == 0, done.stderr[-3000:]
    limit = int(re.search(r"== dense \(timeout (\d+) s\)", done.stdout).group(1))
    assert 60 <= limit <= 120
    done = _dry_run(tmp_path / "short", MODES="dense sparse", CALL_LIMIT_S="45")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== dense: skipped" in done.stdout and "== sparse: skipped" in done.stdout
    done = _dry_run(tmp_path / "bad", CALL_LIMIT_S="9m")
    assert done.returncode == 2 and "CALL_LIMIT_S=9m" in done.stderr
