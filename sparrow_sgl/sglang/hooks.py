"""Hooks the plugin installs through SGLang's `HookRegistry` (applied in every SGLang process).

- `--sparrow-schedule SPEC` on `python -m sglang.launch_server`: taken out of argv and passed on as `SPARROW_SCHEDULE`
  (inherited by the spawned scheduler), because SGLang's own parser rejects unknown flags.
- Request validation: a bad `custom_params["sparrow_schedule"]` raises `ValueError` in `SamplingParams.verify`, which
  SGLang's HTTP server answers with a 400 carrying the message; the server keeps serving.
- Request registration: every `Req` built in the scheduler records its schedule (`request_state.REGISTRY`).
- Response metadata: the scheduler's output streamer adds a request-level customized field `sparrow` (schedule name,
  mean attended KV tokens) when a request finishes, SGLang's extension point for response metadata; the tokenizer
  side unwraps it so that `meta_info["sparrow"]` is a dict.
"""

from __future__ import annotations

import functools
import os

from sparrow_sgl.sglang.request_state import (
    ENV_SCHEDULE,
    META_KEY,
    REGISTRY,
    SCHEDULE_KEY,
    parse_schedule,
    request_schedule,
)

CLI_FLAG = "--sparrow-schedule"


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _take_schedule_flag, HookType.BEFORE)
    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify", _verify_schedule, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.schedule_batch.Req.__init__", _register_request, HookType.AFTER)
    HookRegistry.register(
        "sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class", _streamer_class, HookType.REPLACE
    )
    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
        _unwrap_meta,
        HookType.AFTER,
    )


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
    parse_schedule(value)  # refuse a bad default at launch, not at the first request
    os.environ[ENV_SCHEDULE] = value
    return (rest, *args), kwargs


def _verify_schedule(result, sampling_params, *args, **kwargs):
    custom = sampling_params.custom_params
    if isinstance(custom, dict) and SCHEDULE_KEY in custom:
        request_schedule(custom)  # ConfigError is a ValueError: the HTTP server answers 400 with its message


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


def _unwrap_meta(result, manager, meta_info, *args, **kwargs):
    value = meta_info.get(META_KEY)
    if isinstance(value, list):
        if value:
            meta_info[META_KEY] = value[-1]
        else:
            del meta_info[META_KEY]
