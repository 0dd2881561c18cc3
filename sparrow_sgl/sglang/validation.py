"""Request checks in front of SGLang's scheduler: 400 with a one-line reason instead of a dead server.

SGLang 0.5.23 hands some malformed generate requests to the model, where they raise inside the scheduler's event loop;
the scheduler exits and takes the whole server (every in-flight request) with it:
- a prompt that tokenizes to no tokens (`{"text": ""}`): `IndexError` in `layers/logits_processor.py`;
- a token id outside `[0, vocab)` (`{"input_ids": [1, 2, 99999]}`): `IndexError` in the embedding.
Both happen with the stock backend too (`sparrow serve --dense`): they are SGLang's bugs, not the plugin's.

`check_request` runs as a BEFORE hook on `TokenizerManager._validate_one_request(obj, input_ids)`, the one call every
generate request passes after tokenization and before the scheduler sees it: `/generate` (single, batch of texts or
token ids, n > 1), `/v1/completions`, `/v1/chat/completions` and the Python `Engine`. A `ValueError` raised there is
answered with a 400 carrying its message by every route. SGLang's own checks (negative or over-context
`max_new_tokens`, types of `/generate` fields) stay in place; these add what it lets through.

The weight and memory routes get the same treatment (each check says what SGLang 0.5.23 did without it):
`/update_weights_from_disk` (shapes, load_format, local paths; a failed load rolls back from the served path),
`/update_weights_from_tensor` (payload list here, every tensor in the scheduler before the first is loaded),
`/release_memory_occupation` / `/resume_memory_occupation` (tags, release/resume once each, waits for running
requests, refused on a CPU-only host) and no generate request while memory is released.

`install_error_handler` replaces SGLang's handler for FastAPI's request-validation errors (OpenAI routes), whose
message embeds the server's source file and line (`File ".../http_server.py", line N`) over several lines;
`clean_error` / `clean_openai_error` strip source locations from the other 400s (e.g. xgrammar's C++ file and line).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import json
import re
from pathlib import Path

from sparrow_sgl.config import ConfigError
from sparrow_sgl.sglang.request_state import SCHEDULE_KEY, parse_schedule, request_schedule

BACKEND_NAME = "sparrow"
SOURCE_LOCATION = re.compile(  # a log timestamp, a Python traceback line, a source file path with its line numbers
    r"\[\d\d:\d\d:\d\d\]\s*"
    r'|File "[^"]*", line \d+(?:, in [\w<>.]+)?'
    r"|(?:/[\w.+-]+)+\.(?:pyx|py|cpp|cc|cu|hpp|h|c|rs)\b(?::\d+)*:?"
)
JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array"}
# prompts x n of one request: SGLang copies each prompt n times in the HTTP process before any check, so n=10**9
# grew that process by GBs per second until the host ran out of memory (the server never answered again)
MAX_SAMPLES = 16384
WEIGHT_SHAPE_KEYS = (  # config.json fields that fix the weights' shapes
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
TENSOR_LOAD_FORMATS = (None, "direct", "flattened_bucket")  # what update_weights_from_tensor knows
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES
RELEASED: set[str] = set()  # memory tags released and not resumed (HTTP process: the one TokenizerManager)
IN_PLACE_FORMATS = ("auto", "safetensors", "pt")  # load formats /update_weights_from_disk can reload with
# fields of a batch request that may be a list with one entry per prompt
PER_PROMPT_LISTS = (
    "sampling_params",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "token_ids_logprob",
    "lora_path",
    "custom_logit_processor",
    "return_hidden_states",
)


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); the message is one line and names the field."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def public_message(message) -> str:
    """An error message as a client should see it: one line, no server source locations (paths, line numbers, log
    timestamps), e.g. xgrammar's "[22:15:41] /project/cpp/regex_converter.cc:83: Regex parsing error ..."."""
    return one_line(re.sub(r" {2,}", " ", SOURCE_LOCATION.sub("", str(message))))


def one_line(message: str, limit: int = 1000) -> str:
    text = re.sub(r"\s*[\r\n\t]\s*", " ", str(message)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_request(obj, input_ids, vocab_size: int, sparse_server: bool) -> None:
    """Refuse a generate request (one prompt of a batch) the scheduler cannot serve; `input_ids` are its tokens."""
    if not hasattr(obj, "return_logprob"):  # embedding requests: not served by rollout servers, SGLang checks them
        return
    if not _continues_session(obj) and not obj.contains_mm_input():  # SGLang rebuilds / expands those prompts
        check_prompt(input_ids, obj.text, vocab_size)
    params = obj.sampling_params if obj.sampling_params is not None else {}
    if not isinstance(params, dict):
        raise RequestError(f"sampling_params must be a JSON object, got {_json_type(params)}")
    check_sampling_params(params, vocab_size)
    if obj.return_logprob:
        check_logprob_fields(obj.top_logprobs_num, obj.logprob_start_len, vocab_size)
    check_schedule(params.get("custom_params"), sparse_server)


def check_prompt(input_ids, text, vocab_size: int) -> None:
    if input_ids is None:  # input_embeds: SGLang checks those
        return
    if len(input_ids) == 0:
        if text is not None:
            raise RequestError(f"the prompt {_quote(text)} tokenizes to no tokens; a prompt needs at least one token")
        raise RequestError("input_ids is empty; a prompt needs at least one token")
    for i, token in enumerate(input_ids):
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise RequestError(
                f"prompt token {_quote(token)} at position {i} is not a token id of this model "
                f"(integers in [0, {vocab_size}))"
            )


def check_sampling_params(params: dict, vocab_size: int) -> None:
    custom = params.get("custom_params")
    if custom is not None and not isinstance(custom, dict):
        raise RequestError(f"sampling_params.custom_params must be a JSON object, got {_json_type(custom)}")
    _check_n(params.get("n", 1))
    stop_regex = params.get("stop_regex")
    for pattern in [stop_regex] if isinstance(stop_regex, str) else stop_regex or []:
        try:  # SGLang compiles it after this check, where a bad pattern is a 500
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise RequestError(f"sampling_params.stop_regex {_quote(pattern)} is no regular expression: {e}") from None
    stop_ids = params.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < vocab_size for t in stop_ids):
            raise RequestError(
                f"sampling_params.stop_token_ids must be a list of token ids in [0, {vocab_size}), "
                f"got {_quote(stop_ids)}"
            )


def check_parallel_sampling(obj) -> None:
    """BEFORE hook of `GenerateReqInput._handle_parallel_sampling()`, which makes n copies of each prompt: n must be
    an integer in [1, MAX_SAMPLES] and prompts x n at most MAX_SAMPLES. Per-prompt lists must have one entry per
    prompt, and a single prompt's `rid` must be a string (SGLang indexes them later: an IndexError/TypeError, a 500)."""
    check_per_prompt_lists(obj)
    items = obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params]
    prompts = 1 if obj.is_single else obj.batch_size
    for params in items:
        n = params.get("n", 1) if isinstance(params, dict) else 1  # other types: refused by `check_request`
        _check_n(n)
        if n > 1 and prompts * n > MAX_SAMPLES:
            raise RequestError(
                f"{prompts} prompts x n={n} samples is above the {MAX_SAMPLES} samples one request may ask for; "
                "send them in several requests"
            )


def check_per_prompt_lists(obj) -> None:
    if obj.is_single:
        for name, value in (("rid", obj.rid), ("sampling_params", obj.sampling_params)):
            if isinstance(value, list):
                raise RequestError(f"{name} must not be a list for a single prompt (lists go with a list of prompts)")
        return
    for name in PER_PROMPT_LISTS:
        value = getattr(obj, name, None)
        if name == "token_ids_logprob" and not (value and isinstance(value[0], list)):
            continue  # one list of token ids shared by every prompt
        if isinstance(value, list) and len(value) != obj.batch_size:
            raise RequestError(
                f"{name} has {len(value)} entries for {obj.batch_size} prompts; give one per prompt or a single value"
            )


def _check_n(n) -> None:
    if not _is_int(n) or not 1 <= n <= MAX_SAMPLES:
        raise RequestError(f"sampling_params.n (OpenAI: n) must be an integer in [1, {MAX_SAMPLES}], got {_quote(n)}")


def check_logprob_fields(top_logprobs_num, logprob_start_len, vocab_size: int) -> None:
    top = 0 if top_logprobs_num is None else top_logprobs_num
    if not _is_int(top) or not 0 <= top <= vocab_size:
        raise RequestError(
            f"top_logprobs_num (OpenAI: logprobs / top_logprobs) must be an integer in [0, {vocab_size}], "
            f"got {_quote(top)}"
        )
    start = -1 if logprob_start_len is None else logprob_start_len
    if not _is_int(start) or start < -1:
        raise RequestError(f"logprob_start_len must be an integer >= -1 (-1: no prompt log-probs), got {_quote(start)}")


def check_schedule(custom_params, sparse_server: bool) -> None:
    """A per-request schedule must parse (no files) and fit the server; a dense server takes none that is sparse."""
    if not isinstance(custom_params, dict) or custom_params.get(SCHEDULE_KEY) is None:
        return
    try:
        schedule = request_schedule(custom_params) if sparse_server else parse_schedule(custom_params[SCHEDULE_KEY])
    except ConfigError as e:
        raise RequestError(str(e)) from None
    if not sparse_server and not schedule.is_dense:
        raise RequestError(
            f"{SCHEDULE_KEY} {schedule.name or 'custom'!r} is sparse but this server decodes densely (started with "
            f"--dense or another attention backend than {BACKEND_NAME!r}); send it to a `sparrow serve` server "
            f"without --dense, or leave {SCHEDULE_KEY} out"
        )


def weights_mismatch(model_path, hf_config) -> str | None:
    """Why `/update_weights_from_disk` must not load `model_path` into the served model, or None. SGLang 0.5.23 loads
    weights of other shapes until a copy fails, then fails to reload the old ones and the scheduler dies (the whole
    server); a directory without config.json is left to SGLang's own (400) message."""
    config = Path(str(model_path)) / "config.json"
    if not config.is_file():
        return None
    try:
        theirs = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        return f"model_path {model_path}: config.json is not readable JSON ({e})"
    for key in WEIGHT_SHAPE_KEYS:
        mine, new = getattr(hf_config, key, None), theirs.get(key) if isinstance(theirs, dict) else None
        if mine is not None and new is not None and new != mine:
            return (
                f"model_path {model_path}: {key}={new!r} differs from the served model's {mine!r}; "
                "update_weights_from_disk takes weights of the same architecture and shapes only"
            )
    return None


async def check_weights_update(original, manager, obj, *args, **kwargs):
    """AROUND hook of `TokenizerManager.update_weights_from_disk(obj, request)` -> (success, message, paused)."""
    problem = (
        load_format_problem(obj.load_format)
        or model_path_problem(obj.model_path)
        or weights_mismatch(obj.model_path, manager.model_config.hf_config)
    )
    if problem is not None:
        return False, problem, 0
    success, message, *rest = await original(manager, obj, *args, **kwargs)
    if not success and str(message).startswith("Failed to get model loader"):  # ends in an object's repr
        message = (
            f"load_format {obj.load_format!r} cannot reload weights in place (SGLang 0.5.23 does that with its "
            f"default loader only); use one of {', '.join(map(repr, IN_PLACE_FORMATS))}"
        )
    return (success, public_message(message), *rest)


def guard_disk_load(original, updater, model_path, load_format, *args, **kwargs):
    """AROUND hook of the scheduler's `WeightUpdater.update_weights_from_disk(model_path, load_format, ...)`. SGLang
    0.5.23 points `model_config.model_path` at the new path before it loads, and leaves it there when the load fails:
    its rollback then reloaded the failing files (a corrupt weight file: the rollback raised and the scheduler died),
    and every later rollback would too. The served path is kept on failure, and the rollback reloads from it."""
    served = updater.model_config.model_path
    try:
        success, message = original(updater, model_path, load_format, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- SGLang's rollback from the new path failed: roll back from the served one
        updater.model_config.model_path = served
        served_format = updater.get_model_runner().server_args.load_format
        restored, why = original(updater, served, served_format, *args, **kwargs)
        if not restored:
            raise RuntimeError(f"weights of {model_path} failed to load and {served} failed to reload: {why}") from e
        reason = str(e).split(". ")[0]  # torch's unpickling errors go on for a paragraph
        return False, public_message(f"{model_path} could not be loaded ({reason}); the served weights were reloaded")
    if not success:
        updater.model_config.model_path = served
    return success, message


def load_format_problem(load_format) -> str | None:
    """A `load_format` SGLang does not know raised in the scheduler (`LoadConfig`: ValueError) and killed it."""
    from sglang.srt.configs.load_config import LoadFormat

    if load_format is None or load_format in {f.value for f in LoadFormat}:
        return None
    return f"load_format {_quote(load_format)} is no load format of SGLang; use one of {', '.join(IN_PLACE_FORMATS)}"


def model_path_problem(model_path) -> str | None:
    """A local path (absolute or ./, ../) must be a directory on the server; SGLang took a missing one for a Hugging
    Face repository id and answered "Name or service not known". Other strings stay repository ids for SGLang."""
    text = str(model_path)
    if not text.strip():
        return "model_path is empty; give the directory of the new weights"
    path = Path(text)
    if not (path.is_absolute() or text.startswith(("./", "../")) or path.exists()):
        return None
    if not path.exists():
        return f"model_path {text} does not exist on the server"
    if not path.is_dir():
        return f"model_path {text} is a file; give the directory that holds the model's weights"
    return None


async def check_tensor_update(original, manager, obj, *args, **kwargs):
    """AROUND hook of `TokenizerManager.update_weights_from_tensor(obj, request)` -> (success, message): the payload
    list is checked here (an empty one raised IndexError in the scheduler and killed it); the tensors themselves in
    the scheduler (`check_tensor_load`), the only process that may open them (CUDA IPC handles, shared memory)."""
    problem = payload_list_problem(obj.serialized_named_tensors, manager.server_args.tp_size)
    if problem is not None:
        return False, problem
    return await original(manager, obj, *args, **kwargs)


def payload_list_problem(payloads, ranks: int) -> str | None:
    if not isinstance(payloads, list) or len(payloads) != ranks:
        count = len(payloads) if isinstance(payloads, list) else _json_type(payloads)
        return (
            f"serialized_named_tensors has {count} entries; it takes one serialized list of (name, tensor) pairs "
            f"per tensor-parallel rank ({ranks})"
        )
    for i, payload in enumerate(payloads):
        if isinstance(payload, str):
            try:
                base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                return f"serialized_named_tensors[{i}] is not base64 ({e})"
    return None


class UnreadablePayload:
    """What `deserialize_own_rank` returns instead of raising (a raise there killed the scheduler)."""

    def __init__(self, error: Exception) -> None:
        self.message = public_message(f"serialized_named_tensors could not be read: {type(error).__name__}: {error}")


def read_payload(original, worker, payloads, *args, **kwargs):
    """AROUND hook of the scheduler's `TpModelWorker.deserialize_own_rank(payloads)`."""
    try:
        return original(worker, payloads, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- any unreadable payload: a pickle error, a blocked global, an IndexError
        return UnreadablePayload(e)


def check_tensor_load(original, updater, named_tensors, load_format=None, *args, **kwargs):
    """AROUND hook of the scheduler's `WeightUpdater.update_weights_from_tensor(named_tensors, load_format)`: every
    tensor is checked before the first is loaded. SGLang 0.5.23 loaded them in order until one failed (a shape assert,
    a KeyError, an unknown load_format), leaving the weights half updated, and the exception killed the scheduler;
    an unknown name was skipped with a log line and the update reported success."""
    if isinstance(named_tensors, UnreadablePayload):
        return False, named_tensors.message
    if load_format not in TENSOR_LOAD_FORMATS and load_format not in updater.custom_weight_loaders:
        return False, f"load_format {_quote(load_format)} is not one of {TENSOR_LOAD_FORMATS} or a custom loader"
    named_tensors, problem = loadable_tensors(updater, named_tensors, load_format)
    if problem is not None:
        return False, f"update_weights_from_tensor: {problem}; no weight was changed"
    try:
        return original(updater, named_tensors, load_format, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- a dead scheduler loses every request; say what may have changed
        return False, public_message(f"update_weights_from_tensor failed: {e}; the weights may be partly updated")


def loadable_tensors(updater, named_tensors, load_format) -> tuple[object, str | None]:
    """(the tensors to load, None) or (_, why not): pairs of a known name and a tensor of its shape and kind."""
    if load_format not in TENSOR_LOAD_FORMATS:
        return named_tensors, None  # a custom loader: its own names and rules
    if load_format == "direct":
        params = updater.get_model().named_parameters()
        expected = {name: (tuple(p.shape), p.dtype.is_floating_point) for name, p in params}
    else:
        tied = bool(getattr(updater.model_config.hf_config, "tie_word_embeddings", False))
        expected = checkpoint_layout(str(updater.get_model_runner().server_args.model_path), tied)
    if load_format == "flattened_bucket":
        return named_tensors, bucket_problem(named_tensors, expected)
    pairs, problem = named_pairs(named_tensors, updater.tp_rank)
    if problem is None and expected:
        problem = next(filter(None, (tensor_problem(n, t, expected) for n, t in pairs)), None)
    return pairs, problem


def named_pairs(named_tensors, tp_rank: int) -> tuple[list, str | None]:
    from sglang.srt.model_executor.model_runner_components.weight_updater import LocalSerializedTensor

    if not isinstance(named_tensors, (list, tuple)) or not named_tensors:
        held = "an empty list" if isinstance(named_tensors, (list, tuple)) else type(named_tensors).__name__
        return [], f"the payload holds {held}, not a non-empty list of (name, tensor) pairs"
    pairs = []
    for item in named_tensors:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            return [], f"a payload entry of type {type(item).__name__} is not a (name, tensor) pair"
        name, tensor = item
        if isinstance(tensor, LocalSerializedTensor):
            try:
                tensor = tensor.get(tp_rank)
            except Exception as e:  # noqa: BLE001
                return [], public_message(f"tensor {name!r} could not be read: {type(e).__name__}: {e}")
        pairs.append((name, tensor))
    return pairs, None


def tensor_problem(name: str, tensor, expected: dict) -> str | None:
    import torch

    if not isinstance(tensor, torch.Tensor):
        return f"{name!r} comes with {_quote(tensor)}, not a tensor"
    if name not in expected and "rotary_emb." in name:
        return None  # rotary caches of older checkpoints: SGLang's loaders skip them
    if name not in expected:
        near = difflib.get_close_matches(name, expected, n=1)
        return f"{name!r} is no parameter of the served model" + (f" (nearest: {near[0]!r})" if near else "")
    shape, floating = expected[name]
    if tuple(tensor.shape) != shape:
        return f"{name!r} has shape {list(tensor.shape)}, the served model's is {list(shape)}"
    if tensor.dtype.is_floating_point != floating:
        kind = "a floating-point" if floating else "an integer"
        return f"{name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, the served model's is {kind} tensor"
    return None


def bucket_problem(bucket, expected: dict) -> str | None:
    """A `flattened_bucket` payload: {"flattened_tensor": 1-D tensor, "metadata": [FlattenedTensorMetadata]}."""
    import torch

    if not isinstance(bucket, dict) or not {"flattened_tensor", "metadata"} <= bucket.keys():
        return "a flattened_bucket payload is a dict with 'flattened_tensor' and 'metadata'"
    flat, metadata = bucket["flattened_tensor"], bucket["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or not isinstance(metadata, list) or not metadata:
        return "flattened_tensor must be a 1-D tensor and metadata a non-empty list"
    for meta in metadata:
        try:
            view = flat[meta.start_idx : meta.end_idx].view(meta.dtype).reshape(meta.shape)
        except Exception as e:  # noqa: BLE001 -- bounds, sizes and dtypes that do not fit the flat tensor
            return public_message(f"bucket entry {getattr(meta, 'name', meta)!r} does not fit flattened_tensor: {e}")
        problem = tensor_problem(meta.name, view, expected) if expected else None
        if problem is not None:
            return problem
    return None


@functools.cache
def checkpoint_layout(model_path: str, tied: bool) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Name -> (shape, floating point) of the served checkpoint's tensors (safetensors headers of `model_path`; empty
    when it is no local directory of safetensors files); `lm_head.weight` too when it is tied to the embedding."""
    layout = {}
    for file in sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else ():
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                layout[name] = (tuple(info["shape"]), info["dtype"].startswith(("F", "BF")))
    if tied and "model.embed_tokens.weight" in layout:
        layout.setdefault("lm_head.weight", layout["model.embed_tokens.weight"])
    return layout


async def check_release(original, manager, obj, *args, **kwargs):
    """AROUND hook of `TokenizerManager.release_memory_occupation(obj, request)`: known tags, none released twice (a
    second release exported the weights' buffers from freed memory); it waits for running requests (SGLang asserts
    an idle scheduler: a release during a generate killed it) and keeps new ones out while it runs."""
    tags = memory_tags(obj, release=True)
    check_release_supported()
    await _exclusive(manager, original(manager, obj, *args, **kwargs))
    RELEASED.update(tags)


async def check_resume(original, manager, obj, *args, **kwargs):
    """AROUND hook of `TokenizerManager.resume_memory_occupation(obj, request)`: only released tags (SGLang 0.5.23
    resumed any other with a KeyError in `offload_tags.remove` that killed the scheduler)."""
    tags = memory_tags(obj, release=False)
    await _exclusive(manager, original(manager, obj, *args, **kwargs))
    RELEASED.difference_update(tags)


def memory_tags(obj, release: bool) -> list[str]:
    """The request's tags (none: all), each once; a RequestError (400) for an unknown one, a second release or the
    resume of a tag that is not released."""
    tags = list(dict.fromkeys(obj.tags or MEMORY_TAGS))
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise RequestError(f"unknown memory tags {unknown}; the tags are {list(MEMORY_TAGS)} (none: all of them)")
    if release:
        again = [t for t in tags if t in RELEASED]
        if again:
            raise RequestError(f"memory {again} is already released; /resume_memory_occupation resumes it")
    else:
        missing = [t for t in tags if t not in RELEASED]
        if missing:
            held = sorted(RELEASED) or "nothing"
            raise RequestError(f"memory {missing} is not released, so it cannot be resumed (released: {held})")
    obj.tags = tags
    return tags


def check_release_supported() -> None:
    """SGLang 0.5.23 ends a release with `torch.get_device_module().synchronize()`, which is `torch.cuda` on a host
    without an accelerator: the scheduler died (`Found no NVIDIA driver`) after it had flushed the cache."""
    import torch

    if not torch.get_device_module().is_available():
        raise RequestError(
            "release_memory_occupation needs a GPU server: SGLang 0.5.23 cannot release memory on a CPU-only host"
        )


def check_memory_held() -> None:
    """A generate request while memory is released would run on freed weights or KV cache: refused."""
    if RELEASED:
        raise RequestError(
            f"the server has released its memory {sorted(RELEASED)} and generates nothing until "
            "/resume_memory_occupation resumes it"
        )


async def _exclusive(manager, call) -> None:
    """Await `call` with no generate request running, as SGLang's weight updates do (paused: as it is)."""
    async with manager.is_pause_cond:
        paused = manager.is_pause
        if paused:
            await call
    if not paused:
        async with manager.model_update_lock.writer_lock:
            await call


def is_sparse_server(server_args) -> bool:
    from sglang.srt.arg_groups.model_override_base import attention_backends_of

    return BACKEND_NAME in attention_backends_of(server_args)


def clean_error(error, *args, **kwargs):
    """BEFORE hook of SGLang's `http_server._create_error_response(e)`: the same error with a public message."""
    cleaned = ValueError(public_message(error))
    if hasattr(error, "status_code"):
        cleaned.status_code = error.status_code
    return (cleaned, *args), kwargs


def clean_openai_error(serving, message, *args, **kwargs):
    """BEFORE hook of `OpenAIServingBase.create_error_response(message, ...)`."""
    return (serving, public_message(message), *args), kwargs


def name_contract_field(error, body, *args, **kwargs):
    """AFTER hook of SGLang's `/generate` schema check `generate_contract_error(body)`, whose message does not say
    which field it refuses ("invalid type: string "hot", expected f64"): the first field refused alone is named."""
    if error is None or not isinstance(body, dict):
        return error
    from sglang.api.v1.api_types import GenerateRequest, JsonContractError

    def refused(part: dict) -> bool:
        try:
            GenerateRequest.from_json_value(part)
        except JsonContractError:
            return True
        return False

    for key, value in body.items():
        inner = value.items() if key == "sampling_params" and isinstance(value, dict) else ()
        field = next((f"{key}.{k}" for k, v in inner if refused({key: {k: v}})), None)
        if field or refused({key: value}):
            return f"{field or key}: {error}"
    return error


def install_error_handler(app) -> None:
    """Answer FastAPI request-validation errors (OpenAI routes) with a one-line 400 naming each bad field; SGLang's
    handler stays for the routes whose error shape it owns (Anthropic `/v1/messages`, `/v1/systemone`)."""
    from fastapi.exceptions import RequestValidationError

    original = app.exception_handlers.get(RequestValidationError)

    async def handler(request, exc):
        if original is not None and request.url.path.startswith(("/v1/messages", "/v1/systemone")):
            return await original(request, exc)
        return validation_error_response(request, exc)

    app.add_exception_handler(RequestValidationError, handler)


def validation_error_response(request, exc):
    from fastapi.responses import ORJSONResponse

    errors = exc.errors()
    # SGLang's msgspec request structs (weight and memory routes) fail twice: "should be an instance of X" and the
    # field's own error under a `function-after[build_struct(), X]` location; the field's error says it alone
    named = [e for e in errors if e.get("type") != "is_instance_of"] or errors
    parts = []
    for err in named:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and "[" not in str(x)) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    message = one_line("invalid request: " + "; ".join(parts))
    error = {"message": message, "type": "BadRequest", "param": None, "code": 400}
    body = {"error": error} if request.url.path.startswith("/v1/responses") else {"object": "error", **error}
    return ORJSONResponse(status_code=400, content=body)


def _continues_session(obj) -> bool:
    """A session request's prompt may come from the session's history (SGLang refuses it if it stays empty)."""
    return isinstance(obj.session_params, dict) and bool(obj.session_params.get("id"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def _quote(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
