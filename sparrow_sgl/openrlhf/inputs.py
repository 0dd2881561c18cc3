"""What an OpenRLHF run names on its command line — model, prompt data, reward file — exists and fits, and its
flags pass OpenRLHF's own asserts, checked before Ray starts: a typo or a rejected combination fails here as one
line, not as a traceback or after the models have loaded in every actor."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path

from sparrow_sgl.config import ConfigError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")  # what OpenRLHF loads as local files


def check_inputs(flat: dict, local_model: bool) -> None:
    """The model, prompt data and reward file the run names exist and fit, so a typo fails here and not after Ray
    started and the models loaded. A Hub name (`org/model`, a Hub dataset) is left to OpenRLHF where it can load
    one: a model only with `--sglang.url` servers (the engines we start load a local directory)."""
    model = flat.get("actor.model_name_or_path")
    if model and (local_model or not _remote_name(model)):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--actor.model_name_or_path {model}: model directory not found")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--actor.model_name_or_path {model}: no config.json, not a Hugging Face model directory")
    for flag in ("data.prompt_dataset", "eval.dataset"):
        for entry in (flat.get(flag) or "").split(","):
            _check_dataset(flag, entry.split("@")[0].strip(), flat.get("data.input_key"), flat.get("data.label_key"))
    reward = (flat.get("reward.remote_url") or "").split(",")[0].strip()
    if reward.endswith(".py"):  # OpenRLHF loads its `reward_func` in every engine (agent.py:198-205)
        _check_reward_file(reward)


def _remote_name(name: str) -> bool:
    """A Hub name (`model`, `org/model`) rather than a local path."""
    return not Path(name).expanduser().exists() and not name.startswith(("/", ".", "~")) and name.count("/") <= 1


def _check_dataset(flag: str, name: str, input_key: str | None, label_key: str | None) -> None:
    if not name:
        return
    path = Path(name).expanduser()
    if path.suffix.lower() not in DATA_SUFFIXES and _remote_name(name):
        return
    if not path.exists():
        raise ConfigError(f"--{flag} {name}: not found")
    first = _first_row(path)
    if first is None:
        return
    for key_flag, key in (("--data.input_key", input_key), ("--data.label_key", label_key)):
        if key is not None and key not in first:
            raise ConfigError(f"--{flag} {name}: the first row has no {key_flag} field {key!r} "
                              f"(its fields: {', '.join(map(str, first)) or 'none'})")


def _first_row(path: Path) -> dict | None:
    """The first record of a local JSON-lines or parquet file (None where it cannot be read cheaply)."""
    if path.suffix.lower() == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        return dict.fromkeys(pq.read_schema(path).names)
    if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as f:
        line = next((line for line in f if line.strip()), None)
    if line is None:
        raise ConfigError(f"prompt dataset {path} is empty")
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None  # a pretty-printed JSON document: the datasets library reads it whole
    return row if isinstance(row, dict) else None


def _check_reward_file(path: str) -> None:
    try:
        tree = ast.parse(Path(path).expanduser().read_text(encoding="utf-8"), filename=path)
    except FileNotFoundError:
        raise ConfigError(f"--reward.remote_url {path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"--reward.remote_url {path}: cannot be read as Python: {e}") from None
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    if "reward_func" not in names:
        raise ConfigError(f"--reward.remote_url {path}: defines no top-level reward_func(queries, prompts, labels)")


# OpenRLHF 0.11.2's defaults for the flags its own checks read (a namespace without them, as in unit tests).
OPENRLHF_DEFAULTS = {
    "actor.num_nodes": 1, "actor.num_gpus_per_node": 8, "ref.num_nodes": 1, "ref.num_gpus_per_node": 8,
    "critic.num_nodes": 1, "critic.num_gpus_per_node": 8, "reward.num_nodes": 1, "reward.num_gpus_per_node": 8,
    "rollout.batch_size": 1024, "rollout.micro_batch_size": 1, "rollout.n_samples_per_prompt": 1,
    "rollout.vllm_generate_batch_size": None, "algo.advantage.estimator": "gae", "algo.kl.init_coef": 0.01,
    "algo.advantage.is_correction_threshold": [0.5, 5.0], "algo.dynamic_filtering_enable": False,
    "algo.dynamic_filtering_range": (0, 1), "ds.ring_attn_size": 1, "ds.tensor_parallel_size": 1,
    "ds.param_dtype": "bf16", "train.colocate_all": False, "train.colocate_actor_ref": False,
    "train.colocate_critic_reward": False, "train.async_enable": False, "train.async_queue_size": 1,
    "train.partial_rollout_enable": False, "train.agent_func_path": None, "reward.remote_url": None,
    "eval.dataset": None, "vllm.enable_sleep": False, "vllm.num_engines": None, "vllm.tensor_parallel_size": 1,
    "data.max_images_per_prompt": 0, "critic.model_name_or_path": None, "reward.model_name_or_path": None,
}
Getter = Callable[[str], object]  # a flag's value, OpenRLHF's default where the namespace lacks it
GROUP_ESTIMATORS = ("rloo", "reinforce_baseline", "group_norm", "dr_grpo")  # baseline from the prompt's samples


def check_openrlhf(flat: dict) -> None:
    """The flag combinations OpenRLHF 0.11.2 itself rejects with an `assert` (cli/train_ppo_ray.py: its `__main__`
    and `train()`; DeepspeedStrategy; the async trainer), refused here as one line before Ray: there each was a
    traceback, the `train()` ones only after Ray had started. Expects a run with rollout engines."""
    get = _getter(flat)
    for rule in (_batch_rule, _estimator_rule, _critic_rule, _mode_rule, _colocation_rule):
        message = rule(get)
        if message:
            raise ConfigError(message)


def sleep_warning(flat: dict) -> str | None:
    """OpenRLHF turns `--vllm.enable_sleep` off without `--train.colocate_all` (cli/train_ppo_ray.py:707-709)."""
    if _getter(flat)("vllm.enable_sleep") and not sleep_enabled(flat):
        return ("sparrow openrlhf: warning: --vllm.enable_sleep is off because --train.colocate_all was not given "
                "(the engines sleep only while they share the actor's GPUs): add --train.colocate_all or drop "
                "--vllm.enable_sleep")
    return None


def sleep_enabled(flat: dict) -> bool:
    """`--vllm.enable_sleep` as OpenRLHF applies it: only with `--train.colocate_all`."""
    get = _getter(flat)
    return bool(get("vllm.enable_sleep") and get("train.colocate_all"))


def _getter(flat: dict) -> Getter:
    return lambda key: flat.get(key, OPENRLHF_DEFAULTS[key])


def _actor_processes(get: Getter) -> int:
    gpus = get("actor.num_nodes") * get("actor.num_gpus_per_node")
    return gpus // get("ds.ring_attn_size") // get("ds.tensor_parallel_size")


def _batch_rule(get: Getter) -> str | None:
    """cli/train_ppo_ray.py:739-762 (and its divisions by zero); deepspeed.py:76-78."""
    for key in ("rollout.micro_batch_size", "ds.ring_attn_size", "ds.tensor_parallel_size"):
        if get(key) < 1:
            return f"--{key} must be >= 1, got {get(key)}"
    batches = get("rollout.n_samples_per_prompt") * get("rollout.batch_size") // get("rollout.micro_batch_size")
    if batches < _actor_processes(get):
        return (f"--rollout.n_samples_per_prompt * --rollout.batch_size // --rollout.micro_batch_size gives {batches} "
                f"sample batches for {_actor_processes(get)} actor processes (--actor.num_nodes * "
                "--actor.num_gpus_per_node // --ds.ring_attn_size // --ds.tensor_parallel_size): raise "
                "--rollout.batch_size or lower --rollout.micro_batch_size")
    generate = get("rollout.vllm_generate_batch_size") or get("rollout.batch_size")
    if generate > get("rollout.batch_size") and not get("train.async_enable"):
        return (f"--rollout.vllm_generate_batch_size {generate} > --rollout.batch_size {get('rollout.batch_size')} "
                "over-samples into the async queue: lower it or add --train.async_enable")
    if get("ds.tensor_parallel_size") > 1 and get("ds.param_dtype") != "bf16":
        return "--ds.tensor_parallel_size > 1 needs --ds.param_dtype bf16"
    return None


def _critic_rule(get: Getter) -> str | None:
    """cli/train_ppo_ray.py:644-650: gae starts its critic from --critic.model_name_or_path, else the reward model,
    else the actor when rewards come from --reward.remote_url; with none of them it failed on `None.split`."""
    if get("algo.advantage.estimator") != "gae" or any(get(key) for key in (
            "critic.model_name_or_path", "reward.model_name_or_path", "reward.remote_url", "train.agent_func_path")):
        return None
    return ("--algo.advantage.estimator gae trains a critic: give --critic.model_name_or_path (or "
            "--reward.model_name_or_path, or --reward.remote_url to start it from the actor), or choose a critic-free "
            "estimator such as group_norm (GRPO)")


def _estimator_rule(get: Getter) -> str | None:
    """cli/train_ppo_ray.py:639-670 and 746-756; the engines' text-only check (factory.py, inside `train()`)."""
    threshold = get("algo.advantage.is_correction_threshold")
    if len(threshold) > 2:
        return f"--algo.advantage.is_correction_threshold takes HIGH or LOW HIGH, got {len(threshold)} values"
    samples, estimator = get("rollout.n_samples_per_prompt"), get("algo.advantage.estimator")
    if estimator in GROUP_ESTIMATORS and samples < 2:
        return (f"--algo.advantage.estimator {estimator} compares the samples of a prompt: set "
                f"--rollout.n_samples_per_prompt > 1 (got {samples})")
    if get("data.max_images_per_prompt"):
        return "sparrow-sgl rollout engines are text-only: leave --data.max_images_per_prompt at 0"
    if get("algo.dynamic_filtering_enable"):
        low, high = get("algo.dynamic_filtering_range")
        if not low < high:
            return f"--algo.dynamic_filtering_range LOW HIGH needs LOW < HIGH, got {low:g} {high:g}"
        if samples < 2:
            return f"--algo.dynamic_filtering_enable needs --rollout.n_samples_per_prompt > 1 (got {samples})"
    return None


def _mode_rule(get: Getter) -> str | None:
    """cli/train_ppo_ray.py:711-726 and 746-756; ppo_trainer_async.py:288-289."""
    scored = get("reward.remote_url") or get("train.agent_func_path")
    for flag in ("eval.dataset", "algo.dynamic_filtering_enable"):
        if get(flag) and not scored:
            return (f"--{flag} is scored by --reward.remote_url or --train.agent_func_path (not by a reward "
                    "model): add one of them")
    if get("train.partial_rollout_enable") and not get("train.async_enable"):
        return "--train.partial_rollout_enable needs --train.async_enable"
    if get("train.async_enable") and get("train.async_queue_size") < 1:
        return f"--train.async_queue_size must be >= 1 with --train.async_enable, got {get('train.async_queue_size')}"
    if get("train.async_enable") and get("vllm.enable_sleep") and get("train.colocate_all"):
        return ("--train.async_enable generates while the actor trains, so the engines cannot sleep: drop "
                "--vllm.enable_sleep")
    return None


def _colocation_rule(get: Getter) -> str | None:
    """train() in cli/train_ppo_ray.py:41-62 and 109-113: after Ray started."""
    actor = (get("actor.num_nodes"), get("actor.num_gpus_per_node"))
    colocated_ref = get("train.colocate_actor_ref") or get("train.colocate_all")
    if colocated_ref and get("algo.kl.init_coef") > 0 and actor != (get("ref.num_nodes"), get("ref.num_gpus_per_node")):
        return (f"--algo.kl.init_coef > 0 with --train.colocate_{'all' if get('train.colocate_all') else 'actor_ref'} "
                f"puts the reference model on the actor's GPUs: set --ref.num_nodes {actor[0]} "
                f"--ref.num_gpus_per_node {actor[1]} (like --actor.*) or --algo.kl.init_coef 0")
    engine_gpus = (get("vllm.num_engines") or 0) * get("vllm.tensor_parallel_size")
    if get("train.colocate_all") and not get("train.async_enable") and actor[0] * actor[1] != engine_gpus:
        return (f"--train.colocate_all shares each actor GPU with an engine: --actor.num_nodes * "
                f"--actor.num_gpus_per_node ({actor[0] * actor[1]}) must equal --vllm.num_engines * "
                f"--vllm.tensor_parallel_size ({engine_gpus})")
    critic = (get("critic.num_nodes"), get("critic.num_gpus_per_node"))
    if get("algo.advantage.estimator") == "gae" and get("train.colocate_critic_reward") \
            and critic != (get("reward.num_nodes"), get("reward.num_gpus_per_node")):
        return (f"--train.colocate_critic_reward puts the reward model on the critic's GPUs: set --reward.num_nodes "
                f"{critic[0]} --reward.num_gpus_per_node {critic[1]} (like --critic.*)")
    return None
