"""`--sparrow.*` / `--sglang.*` flags: parsing, checks against OpenRLHF's flags, and the entry point's dry run."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("openrlhf")

from openrlhf_helpers import grpo_args, run_entry  # noqa: E402

from sparrow_sgl.config import ConfigError, Schedule  # noqa: E402
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
    p.add_argument("--algo.advantage.estimator", default="group_norm")  # GRPO, as the launch scripts
    p.add_argument("--rollout.n_samples_per_prompt", type=int, default=8)
    p.add_argument("--actor.model_name_or_path", default=None)
    p.add_argument("--data.prompt_dataset", default=None)
    p.add_argument("--eval.dataset", default=None)
    p.add_argument("--data.input_key", default="input")
    p.add_argument("--data.label_key", default=None)
    p.add_argument("--reward.remote_url", default=None)
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
        (("--vllm.num_engines", "1", "--sparrow.distill.rank", "8"), "distill.rank needs --sparrow.distill.enabled"),
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


@pytest.mark.parametrize(
    "argv, reason",
    [
        (("--sparrow.sync_timeout", "nan"), "sync_timeout must be a finite number of seconds > 0, got nan"),
        (("--sparrow.sync_timeout", "inf"), "sync_timeout must be a finite"),
        (("--sparrow.sync_timeout", "0"), "sync_timeout must be a finite"),
        (("--sparrow.canary_atol", "nan"), "canary_atol must be a finite number >= 0, got nan"),
        (("--sparrow.canary_atol", "-1"), "canary_atol must be a finite"),
        (("--sparrow.canary_tokens", "-1"), "canary_tokens >= 0, got 2048, -1"),
        (("--sparrow.ipc_bucket_mb", "-1"), "ipc_bucket_mb must be 0 .* or a finite number of MiB .*, got -1.0"),
        (("--sparrow.ipc_bucket_mb", "inf"), "ipc_bucket_mb must be 0"),
        (("--sparrow.ipc_bucket_mb", "1e-9"), "of at least one byte .*, got 1e-09"),
        (("--sglang.device", "tpu"), "--sglang.device must be auto, cpu or cuda, got 'tpu'"),
        (("--sglang.dtype", "fp8"), "--sglang.dtype must be auto"),
        (("--sglang.kv_tokens", "-5"), "--sglang.kv_tokens must be >= 1, got -5"),
        (("--sglang.startup_timeout", "-1"), "--sglang.startup_timeout must be a finite"),
        (("--sglang.request_timeout", "nan"), "--sglang.request_timeout must be a finite"),
        (("--sglang.url", ""), "--sglang.url has an empty entry"),
        (("--sglang.extra_args", "--foo 'bar"), "--sglang.extra_args .*: No closing quotation"),
    ],
)
def test_bad_values_are_refused(argv, reason):
    """nan/inf timeouts failed only at the first weight sync (timedelta), after the models loaded; a nan canary
    tolerance let every canary pass and a negative one failed the first sync; bad --sglang.* values failed in
    every engine actor, after Ray started."""
    with pytest.raises(ConfigError, match=reason):
        flags.check(_parse("--vllm.num_engines", "1", *argv))


def _inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "no_config").mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "label": "2"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "reward.py").write_text("import torch\n\ndef reward_func(queries, prompts, labels):\n    pass\n")
    (tmp_path / "other.py").write_text("def score(queries, prompts, labels):\n    pass\n")
    (tmp_path / "broken.py").write_text("def reward_func(:\n")
    (tmp_path / "p32.json").write_text(json.dumps(Schedule.fixed(512, page_size=32).to_dict()))
    return ["--vllm.num_engines", "1", "--actor.model_name_or_path", str(model), "--data.prompt_dataset", str(data),
            "--data.input_key", "prompt", "--data.label_key", "label",
            "--reward.remote_url", str(tmp_path / "reward.py")]


@pytest.mark.parametrize(
    "argv, reason",
    [
        (("--actor.model_name_or_path", "{tmp}/nope"), "model_name_or_path {tmp}/nope: model directory not found"),
        (("--actor.model_name_or_path", "{tmp}/data.jsonl"), "model directory not found"),
        (("--actor.model_name_or_path", "{tmp}/no_config"), "no config.json"),
        (("--data.prompt_dataset", "{tmp}/nope.jsonl"), "prompt_dataset {tmp}/nope.jsonl: not found"),
        (("--data.prompt_dataset", "{tmp}/data.jsonl,/abs/missing_dir"), "/abs/missing_dir: not found"),
        (("--eval.dataset", "{tmp}/nope.parquet"), "--eval.dataset {tmp}/nope.parquet: not found"),
        (("--data.label_key", "answer"), "no --data.label_key field 'answer' \\(its fields: prompt, label\\)"),
        (("--data.input_key", "question"), "no --data.input_key field 'question'"),
        (("--data.prompt_dataset", "{tmp}/empty.jsonl"), "is empty"),
        (("--reward.remote_url", "{tmp}/nope.py"), "remote_url {tmp}/nope.py: file not found"),
        (("--reward.remote_url", "{tmp}/other.py"), "defines no top-level reward_func"),
        (("--reward.remote_url", "{tmp}/broken.py"), "cannot be read as Python"),
        (("--sparrow.schedule", "{tmp}/p32.json"), "page_size 32, but the rollout engines use 16-token KV pages"),
    ],
)
def test_missing_or_unfit_inputs_are_refused_before_ray(tmp_path, argv, reason):
    """Each passed the dry run and failed only after Ray started and the models loaded (a missing model or data
    file, a dataset without the input/label field: OpenRLHF's KeyError in the trainer actor; a reward file without
    reward_func: every engine; a schedule with another page size: the engines)."""
    base = _inputs(tmp_path)
    flags.check(_parse(*base))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(ConfigError, match=reason.replace("{tmp}", str(tmp_path))):
        flags.check(_parse(*base, *argv))


def test_hub_names_and_remote_reward_urls_are_left_to_openrlhf(tmp_path):
    """A Hub model name only with running --sglang.url servers: the engines we start load a local directory."""
    base = _inputs(tmp_path)
    flags.check(_parse(*base, "--actor.model_name_or_path", "Qwen/Qwen3-1.7B", "--data.prompt_dataset",
                       "org/polaris@data", "--reward.remote_url", "http://rm:5000/score", "--sglang.url", "http://a:1"))
    for engine in ("sglang", "embedded"):
        with pytest.raises(ConfigError, match="Qwen/Qwen3-1.7B: model directory not found"):
            flags.check(_parse(*base, "--actor.model_name_or_path", "Qwen/Qwen3-1.7B", "--sparrow.engine", engine))


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


def _config_only_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the entry point checks the directory, not the weights
    return model


OPENRLHF_ASSERTS = [  # flags added to one GRPO run on CPU, the one-line reason, where OpenRLHF 0.11.2 asserted
    (("--algo.advantage.is_correction_threshold", "0.5", "1", "2"), "takes HIGH or LOW HIGH, got 3 values"),  # :642
    (("--rollout.n_samples_per_prompt", "1"), "group_norm compares the samples of a prompt: set "
                                              "--rollout.n_samples_per_prompt > 1 (got 1)"),  # :657
    (("--data.max_images_per_prompt", "1"), "text-only: leave --data.max_images_per_prompt at 0"),  # :663,667
    (("--train.colocate_all", "--train.async_enable", "--vllm.enable_sleep"),
     "cannot sleep: drop --vllm.enable_sleep"),  # :715
    (("--train.partial_rollout_enable",), "--train.partial_rollout_enable needs --train.async_enable"),  # :718
    (("--eval.dataset", "{tmp}/prompts.jsonl", "--reward.remote_url", ""), "--eval.dataset is scored by"),  # :721
    (("--rollout.vllm_generate_batch_size", "4"), "4 > --rollout.batch_size 2 over-samples"),  # :741
    (("--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "1", "0"), "LOW < HIGH, got 1 0"),  # :747
    (("--algo.dynamic_filtering_enable", "--reward.remote_url", ""), "dynamic_filtering_enable is scored by"),  # :750
    (("--algo.advantage.estimator", "reinforce", "--rollout.n_samples_per_prompt", "1",
      "--algo.dynamic_filtering_enable"), "dynamic_filtering_enable needs --rollout.n_samples_per_prompt > 1"),
    (("--actor.num_gpus_per_node", "4"), "gives 2 sample batches for 4 actor processes"),  # :757
    (("--rollout.micro_batch_size", "0"), "--rollout.micro_batch_size must be >= 1, got 0"),  # :757 ZeroDivisionError
    (("--train.colocate_actor_ref", "--algo.kl.init_coef", "0.01"),
     "--ref.num_nodes 1 --ref.num_gpus_per_node 1 (like --actor.*) or --algo.kl.init_coef 0"),  # train() :43
    (("--train.colocate_all", "--vllm.num_engines", "2"), "--actor.num_gpus_per_node (1) must equal"),  # train() :57
    (("--algo.advantage.estimator", "gae", "--train.colocate_critic_reward", "--critic.num_gpus_per_node", "1"),
     "--reward.num_nodes 1 --reward.num_gpus_per_node 1 (like --critic.*)"),  # train() :110
    (("--ds.tensor_parallel_size", "2", "--ds.param_dtype", "fp16"), "needs --ds.param_dtype bf16"),  # deepspeed.py:78
    (("--train.async_enable", "--train.async_queue_size", "0"), "async_queue_size must be >= 1"),  # async trainer
    (("--algo.advantage.estimator", "gae", "--reward.remote_url", ""), "gae trains a critic"),  # :647 None.split
]


@pytest.mark.parametrize("argv, reason", OPENRLHF_ASSERTS)
def test_openrlhf_asserts_are_one_line_errors_before_ray(tmp_path, argv, reason):
    """Each of these passed our checks and hit an `assert` (or a division by zero, or the engines' text-only
    ValueError) in OpenRLHF: a traceback, the `train()` ones only after Ray had started."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = run_entry(grpo_args(_config_only_model(tmp_path), tmp_path, *argv), tmp_path, timeout=240)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith("train_ppo_ray.py: error: ") and reason in last, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Started a local Ray" not in done.stdout + done.stderr


@pytest.mark.parametrize("argv, sleeps", [(("--vllm.enable_sleep",), False),
                                          (("--vllm.enable_sleep", "--train.colocate_all"), True)])
def test_sleep_without_colocate_all_is_one_warning(tmp_path, argv, sleeps):
    """OpenRLHF turned --vllm.enable_sleep off without --train.colocate_all, saying so only in its own words."""
    done = run_entry(grpo_args(_config_only_model(tmp_path), tmp_path, *argv, "--sparrow.dry_run"), tmp_path,
                     timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout[done.stdout.index("{\n"):])["vllm"]["enable_sleep"] is sleeps
    warnings = [line for line in done.stderr.splitlines() if "--vllm.enable_sleep is off" in line]
    assert warnings == ([] if sleeps else ["sparrow openrlhf: warning: --vllm.enable_sleep is off because "
                                           "--train.colocate_all was not given (the engines sleep only while they "
                                           "share the actor's GPUs): add --train.colocate_all or drop "
                                           "--vllm.enable_sleep"])
