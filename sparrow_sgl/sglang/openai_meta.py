"""The `sparrow` report in SGLang's OpenAI-compatible responses, inside SGLang's own `metadata` extension object
(where it already reports `weight_version`); OpenAI clients keep unknown fields and ignore them.

- `/v1/completions`, `/v1/chat/completions`: `metadata["sparrow"]` is a list with one report per choice, in the order
  of `choices` (`metadata.sparrow[i]` belongs to `choices[i]`).
- Streaming: the chunk that carries a choice's `finish_reason` has `metadata: {"sparrow": [report]}` (its one choice);
  other chunks have none.
A server without the sparrow backend (`sparrow serve --dense`) adds nothing.

Streamed chunks are built from the tokenizer's outputs inside SGLang's serving generators, so the report of a finished
streaming request is kept here (by request id, when the tokenizer writes `meta_info`) until its chunk goes out.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from sparrow_sgl.sglang.request_state import META_KEY

MAX_PENDING = 4096  # finished streaming requests whose report waits for its chunk (an abandoned stream leaves one)
_pending: OrderedDict[str, dict] = OrderedDict()
_lock = threading.Lock()


def keep_stream_report(rid: str, report: dict) -> None:
    with _lock:
        _pending[rid] = report
        while len(_pending) > MAX_PENDING:
            _pending.popitem(last=False)


def take_stream_report(rid: str) -> dict | None:
    with _lock:
        return _pending.pop(rid, None)


def add_to_response(response, serving, request, ret, *args, **kwargs):
    """AFTER hook of `_build_completion_response` / `_build_chat_response(request, ret, created)`."""
    reports = [item.get("meta_info", {}).get(META_KEY) for item in ret]
    if hasattr(response, "metadata") and any(r is not None for r in reports):
        response.metadata = {**(response.metadata or {}), META_KEY: reports}
    return response


async def stream_with_reports(original, serving, *args, **kwargs):
    """AROUND hook of `_generate_completion_stream` / `_generate_chat_stream` (async generators of SSE lines)."""
    rids: dict[int, str] = {}  # choice index -> request id (chat's finish chunks all carry the last request's id)
    async for chunk in original(serving, *args, **kwargs):
        yield add_to_chunk(chunk, rids)


def add_to_chunk(chunk: str, rids: dict[int, str]) -> str:
    if not isinstance(chunk, str) or not chunk.startswith("data: {"):
        return chunk
    try:
        data = json.loads(chunk[len("data: ") :])
    except json.JSONDecodeError:
        return chunk
    choices = data.get("choices") or []
    if len(choices) != 1 or "id" not in data:
        return chunk
    index = choices[0].get("index", 0)
    rid = rids.setdefault(index, data["id"])
    if choices[0].get("finish_reason") is None:
        return chunk
    report = take_stream_report(rid)
    if report is None:
        return chunk
    data["metadata"] = {**(data.get("metadata") or {}), META_KEY: [report]}
    return f"data: {json.dumps(data)}\n\n"
