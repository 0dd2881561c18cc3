"""Hooks the plugin installs through SGLang's `HookRegistry` (applied in every SGLang process).

- `--sparrow-schedule SPEC` on `python -m sglang.launch_server`: taken out of argv and passed on as `SPARROW_SCHEDULE`
  (inherited by the spawned scheduler), because SGLang's own parser rejects unknown flags.
- Request validation (`validation.py`): `TokenizerManager._validate_one_request` refuses, with a one-line 400, what
  would crash the scheduler or is malformed, and a bad or misplaced `custom_params["sparrow_schedule"]`.
- Request registration: every `Req` built in the scheduler records its schedule (`request_state.REGISTRY`).
- Response metadata: the scheduler's output streamer adds a request-level customized field `sparrow` (schedule name,
  mean attended KV tokens) when a request finishes, SGLang's extension point for response metadata; the tokenizer
  side writes it as the dict `meta_info["sparrow"]` of that last output only (not accumulated as a per-token list).
- Weight and memory routes (`state_routes.py`): `/update_weights_from_disk` and `/update_weights_from_tensor` refuse
  what SGLang would half-load or crash on (the tensors are checked in the scheduler, before the first is loaded);
  `/release_memory_occupation` / `/resume_memory_occupation` take known tags, each released and resumed once, and
  generate requests are refused while memory is released.
- Weights-update group routes (`group_routes.py`): `/init_weights_update_group` checks its fields and waits a bounded
  time for the trainer's master to listen before the scheduler joins (with a bounded timeout instead of torch's 30 min);
  `/update_weights_from_distributed` and `/destroy_weights_update_group` take initialised groups and tensor lists the
  served model can load whole.
- HTTP process only: one-line 400s for FastAPI validation errors, the report in OpenAI-compatible responses
  (`openai_meta.py`).
"""

from __future__ import annotations

import functools
import multiprocessing
import os

from sparrow_sgl.sglang import group_routes, openai_meta, state_routes, validation
from sparrow_sgl.sglang.request_state import ENV_SCHEDULE, META_KEY, REGISTRY, parse_schedule

CLI_FLAG = "--sparrow-schedule"


TOKENIZER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
OPENAI = "sglang.srt.entrypoints.openai"
HTTP = "sglang.srt.entrypoints.http_server"
TP_WORKER = "sglang.srt.managers.tp_worker.BaseTpWorker"
UPDATER_MODULE = "sglang.srt.model_executor.model_runner_components.weight_updater"
RUNNER_UPDATER = f"{UPDATER_MODULE}.WeightUpdater"


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _take_schedule_flag, HookType.BEFORE)
    HookRegistry.register(f"{TOKENIZER}._validate_one_request", _validate_request, HookType.BEFORE)
    parallel = "sglang.srt.managers.io_struct.GenerateReqInput._handle_parallel_sampling"
    HookRegistry.register(parallel, _check_parallel_sampling, HookType.BEFORE)
    HookRegistry.register("sglang.srt.managers.schedule_batch.Req.__init__", _register_request, HookType.AFTER)
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class", _streamer_class, HookType.REPLACE
    )
    HookRegistry.register(f"{TOKENIZER}.update_request_meta_info", _write_meta, HookType.AROUND)
    # scheduler side of the weight routes: an unreadable payload, a bad tensor, a failed load: a refusal, not a crash
    HookRegistry.register(f"{TP_WORKER}.deserialize_own_rank", state_routes.read_payload, HookType.AROUND)
    tensor_load = f"{RUNNER_UPDATER}.update_weights_from_tensor"
    HookRegistry.register(tensor_load, state_routes.check_tensor_load, HookType.AROUND)
    HookRegistry.register(f"{RUNNER_UPDATER}.update_weights_from_disk", state_routes.guard_disk_load, HookType.AROUND)
    lora_load = f"{TP_WORKER}.load_lora_adapter_from_tensors"
    HookRegistry.register(lora_load, state_routes.guard_lora_tensor_load, HookType.AROUND)
    group_init = f"{UPDATER_MODULE}.init_custom_process_group"
    HookRegistry.register(group_init, group_routes.bounded_group_init, HookType.AROUND)
    HookRegistry.register(f"{RUNNER_UPDATER}.init_weights_update_group", group_routes.guard_group_init, HookType.AROUND)
    if multiprocessing.parent_process() is None:  # the HTTP server's process (SGLang spawns the others)
        _install_http_hooks(HookRegistry, HookType)


def _install_http_hooks(registry, hook_type) -> None:
    registry.register(f"{HTTP}.launch_server", _before_launch, hook_type.BEFORE)
    registry.register(f"{HTTP}._create_error_response", validation.clean_error, hook_type.BEFORE)
    contract = "sglang.srt.entrypoints.api_contract.generate_contract_error"
    registry.register(contract, validation.name_contract_field, hook_type.AFTER)
    registry.register(f"{TOKENIZER}.update_weights_from_disk", state_routes.check_weights_update, hook_type.AROUND)
    registry.register(f"{TOKENIZER}.update_weights_from_tensor", state_routes.check_tensor_update, hook_type.AROUND)
    registry.register(f"{TOKENIZER}.release_memory_occupation", state_routes.check_release, hook_type.AROUND)
    registry.register(f"{TOKENIZER}.resume_memory_occupation", state_routes.check_resume, hook_type.AROUND)
    for route, check in (
        ("init_weights_update_group", group_routes.check_group_init),
        ("destroy_weights_update_group", group_routes.check_group_destroy),
        ("update_weights_from_distributed", group_routes.check_distributed_update),
    ):
        registry.register(f"{TOKENIZER}.{route}", check, hook_type.AROUND)
    base = f"{OPENAI}.serving_base.OpenAIServingBase"
    registry.register(f"{base}.create_error_response", validation.clean_openai_error, hook_type.BEFORE)
    for cls, build, stream in (
        ("serving_completions.OpenAIServingCompletion", "_build_completion_response", "_generate_completion_stream"),
        ("serving_chat.OpenAIServingChat", "_build_chat_response", "_generate_chat_stream"),
    ):
        registry.register(f"{OPENAI}.{cls}.{build}", openai_meta.add_to_response, hook_type.AFTER)
        registry.register(f"{OPENAI}.{cls}.{stream}", openai_meta.stream_with_reports, hook_type.AROUND)


def strip_schedule_flag(argv: list[str]) -> tuple[list[str], str | None]:
    """argv without `--sparrow-schedule X` / `--sparrow-schedule=X`, and X (None when absent)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == CLI_FLAG:
            if i + 1 >= len(argv):
                raise SystemExit(f"{CLI_FLAG} needs a value: a preset name, fixed:N, dense or a schedule JSON path")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(CLI_FLAG + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return rest, value


def _take_schedule_flag(argv, *args, **kwargs):
    rest, value = strip_schedule_flag(list(argv))
    if value is None:
        return None
    parse_schedule(value, allow_files=True)  # refuse a bad default at launch, not at the first request
    os.environ[ENV_SCHEDULE] = value
    return (rest, *args), kwargs


def _validate_request(manager, obj, input_ids, *args, **kwargs):
    sparse = validation.is_sparse_server(manager.server_args)
    state_routes.check_memory_held()
    validation.check_request(obj, input_ids, manager.model_config.vocab_size, sparse)


def _check_parallel_sampling(obj, *args, **kwargs):
    validation.check_parallel_sampling(obj)


def _before_launch(*args, **kwargs):
    from sglang.srt.entrypoints.http_server import app

    validation.install_error_handler(app)
    group_routes.check_env()  # a bad value stops the launch (the scheduler inherits this environment)


def _register_request(result, req, *args, **kwargs):
    REGISTRY.add(req.rid, req.sampling_params.custom_params)


def _streamer_class(scheduler, *args, **kwargs):
    return sparrow_output_streamer()


@functools.cache
def sparrow_output_streamer():
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    class SparrowOutputStreamer(SchedulerOutputStreamer):
        has_additional_customized_info = True

        def should_build_additional_customized_info(self) -> bool:
            return REGISTRY.active

        def build_additional_customized_info(self, reqs) -> dict[str, list]:
            values = []
            for req in reqs:
                report = REGISTRY.pop_report(req.rid) if req.finished() else None
                values.append([report] if report is not None else [])
            return {META_KEY: values}

        def is_request_level_customized_info_key(self, key: str) -> bool:
            return key == META_KEY or super().is_request_level_customized_info_key(key)

    return SparrowOutputStreamer


def _write_meta(original, manager, meta_info, state, customized_info, index, *args, **kwargs):
    """`meta_info["sparrow"]`: the finished request's report (a dict), kept out of SGLang's per-token accumulation."""
    reports = customized_info.get(META_KEY)
    if reports is not None:
        customized_info = {k: v for k, v in customized_info.items() if k != META_KEY}
        if reports[index]:
            meta_info[META_KEY] = reports[index][-1]
            if getattr(state.obj, "stream", False):
                openai_meta.keep_stream_report(meta_info["id"], meta_info[META_KEY])
    if customized_info:
        original(manager, meta_info, state, customized_info, index, *args, **kwargs)
