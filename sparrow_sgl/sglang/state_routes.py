"""Checks of the routes that change the served model's state: 400 with a one-line reason instead of a dead server.

The weight and memory routes get the treatment `validation.py` gives generate requests (each check says what SGLang
0.5.23 did without it): `/update_weights_from_disk` (shapes, load_format, local paths; a failed load rolls back from
the served path), `/update_weights_from_tensor` (payload list here, every tensor in the scheduler before the first
is loaded), `/release_memory_occupation` / `/resume_memory_occupation` (tags, release/resume once each, waits for
running requests, refused on a CPU-only host) and no generate request while memory is released. With LoRA enabled,
`/load_lora_adapter_from_tensors` fails a load (400) that raised inside the scheduler.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import json
from pathlib import Path

from sparrow_sgl.sglang.validation import RequestError, json_type, public_message, quote

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
    return f"load_format {quote(load_format)} is no load format of SGLang; use one of {', '.join(IN_PLACE_FORMATS)}"


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
        count = len(payloads) if isinstance(payloads, list) else json_type(payloads)
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


def guard_lora_tensor_load(original, worker, recv_req, *args, **kwargs):
    """AROUND hook of the scheduler's `TpModelWorker.load_lora_adapter_from_tensors(recv_req)`: SGLang 0.5.23 read
    a flattened bucket out of an unreadable payload and raised its own checksum mismatch there, where a raise killed
    the scheduler; now a failed load (400), the adapters loaded before unchanged (the LoRA manager registers an
    adapter only after its own checks pass)."""
    try:
        return original(worker, recv_req, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- anything raised here would take the whole server down
        from sglang.srt.managers.io_struct import LoRAUpdateOutput

        message = public_message(f"LoRA adapter {recv_req.lora_name!r} was not loaded: {type(e).__name__}: {e}")
        return LoRAUpdateOutput(success=False, error_message=message)


def check_tensor_load(original, updater, named_tensors, load_format=None, *args, **kwargs):
    """AROUND hook of the scheduler's `WeightUpdater.update_weights_from_tensor(named_tensors, load_format)`: every
    tensor is checked before the first is loaded. SGLang 0.5.23 loaded them in order until one failed (a shape assert,
    a KeyError, an unknown load_format), leaving the weights half updated, and the exception killed the scheduler;
    an unknown name was skipped with a log line and the update reported success."""
    if isinstance(named_tensors, UnreadablePayload):
        return False, named_tensors.message
    if load_format not in TENSOR_LOAD_FORMATS and load_format not in updater.custom_weight_loaders:
        return False, f"load_format {quote(load_format)} is not one of {TENSOR_LOAD_FORMATS} or a custom loader"
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
        expected = served_layout(updater.get_model_runner().server_args.model_path, updater.model_config.hf_config)
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
        return f"{name!r} comes with {quote(tensor)}, not a tensor"
    return layout_problem(name, tuple(tensor.shape), tensor.dtype, expected)


def layout_problem(name: str, shape: tuple[int, ...], dtype, expected: dict) -> str | None:
    """Why a tensor of this name, shape and torch dtype is none of `expected` (`checkpoint_layout`), or None."""
    if name not in expected and "rotary_emb." in name:
        return None  # rotary caches of older checkpoints: SGLang's loaders skip them
    if name not in expected:
        near = difflib.get_close_matches(name, expected, n=1)
        return f"{name!r} is no parameter of the served model" + (f" (nearest: {near[0]!r})" if near else "")
    served, floating = expected[name]
    if tuple(shape) != served:
        return f"{name!r} has shape {list(shape)}, the served model's is {list(served)}"
    if dtype.is_floating_point != floating:
        kind = "a floating-point" if floating else "an integer"
        return f"{name!r} has dtype {str(dtype).removeprefix('torch.')}, the served model's is {kind} tensor"
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


def served_layout(model_path, hf_config) -> dict[str, tuple[tuple[int, ...], bool]]:
    """`checkpoint_layout` of the served model (its path and whether its LM head is tied to the embedding)."""
    return checkpoint_layout(str(model_path), bool(getattr(hf_config, "tie_word_embeddings", False)))


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
