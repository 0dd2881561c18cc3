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

`install_error_handler` replaces SGLang's handler for FastAPI's request-validation errors (OpenAI routes), whose
message embeds the server's source file and line (`File ".../http_server.py", line N`) over several lines;
`clean_error` / `clean_openai_error` strip source locations from the other 400s (e.g. xgrammar's C++ file and line).
"""

from __future__ import annotations

import re

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
    if obj.text is not None and obj.input_ids is not None:  # SGLang 0.5.23 serves input_ids, drops text silently
        raise RequestError("give the prompt as text or as input_ids, not both")
    if not _continues_session(obj) and not obj.contains_mm_input():  # SGLang rebuilds / expands those prompts
        check_prompt(input_ids, obj.text, vocab_size)
    params = obj.sampling_params if obj.sampling_params is not None else {}
    if not isinstance(params, dict):
        raise RequestError(f"sampling_params must be a JSON object, got {json_type(params)}")
    check_sampling_params(params, vocab_size)
    if obj.return_logprob:
        check_logprob_fields(obj.top_logprobs_num, obj.logprob_start_len, vocab_size)
    check_schedule(params.get("custom_params"), sparse_server)


def check_prompt(input_ids, text, vocab_size: int) -> None:
    if input_ids is None:  # input_embeds: SGLang checks those
        return
    if len(input_ids) == 0:
        if text is not None:
            raise RequestError(f"the prompt {quote(text)} tokenizes to no tokens; a prompt needs at least one token")
        raise RequestError("input_ids is empty; a prompt needs at least one token")
    for i, token in enumerate(input_ids):
        if not is_int(token) or not 0 <= token < vocab_size:
            raise RequestError(
                f"prompt token {quote(token)} at position {i} is not a token id of this model "
                f"(integers in [0, {vocab_size}))"
            )


def check_sampling_params(params: dict, vocab_size: int) -> None:
    custom = params.get("custom_params")
    if custom is not None and not isinstance(custom, dict):
        raise RequestError(f"sampling_params.custom_params must be a JSON object, got {json_type(custom)}")
    _check_n(params.get("n", 1))
    stop_regex = params.get("stop_regex")
    for pattern in [stop_regex] if isinstance(stop_regex, str) else stop_regex or []:
        try:  # SGLang compiles it after this check, where a bad pattern is a 500
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise RequestError(f"sampling_params.stop_regex {quote(pattern)} is no regular expression: {e}") from None
    stop_ids = params.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(is_int(t) and 0 <= t < vocab_size for t in stop_ids):
            raise RequestError(
                f"sampling_params.stop_token_ids must be a list of token ids in [0, {vocab_size}), "
                f"got {quote(stop_ids)}"
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
    if not is_int(n) or not 1 <= n <= MAX_SAMPLES:
        raise RequestError(f"sampling_params.n (OpenAI: n) must be an integer in [1, {MAX_SAMPLES}], got {quote(n)}")


def check_logprob_fields(top_logprobs_num, logprob_start_len, vocab_size: int) -> None:
    top = 0 if top_logprobs_num is None else top_logprobs_num
    if not is_int(top) or not 0 <= top <= vocab_size:
        raise RequestError(
            f"top_logprobs_num (OpenAI: logprobs / top_logprobs) must be an integer in [0, {vocab_size}], "
            f"got {quote(top)}"
        )
    start = -1 if logprob_start_len is None else logprob_start_len
    if not is_int(start) or start < -1:
        raise RequestError(f"logprob_start_len must be an integer >= -1 (-1: no prompt log-probs), got {quote(start)}")


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


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_type(value) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def quote(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
