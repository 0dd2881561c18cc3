"""Checks of the weights-update group routes (OpenRLHF's weight sync): 400 with a one-line reason, never a hung or dead
scheduler, never half-loaded weights.

`/init_weights_update_group` makes SGLang's scheduler join a torch process group whose rank 0 is the trainer. SGLang
0.5.23 joined it with torch's default timeout (30 min) and no check of its fields: a master address/port where nobody
listens blocked the scheduler for those 30 min (every generate request hung behind it), an empty group name killed
the scheduler (an assert), rank_offset 0 made the server its own master (later updates then "received" uninitialised
memory and loaded it). Here the fields are checked, then a TCP connection to the master is tried for a bounded window
(`SPARROW_WEIGHTS_GROUP_WAIT_S`, default 60 s: OpenRLHF calls the engines before the trainer's rank 0 listens), and
the scheduler's group gets a bounded timeout (`SPARROW_WEIGHTS_GROUP_TIMEOUT_S`, default 600 s, the trainer side's
default `--sparrow.sync_timeout`) for its rendezvous and every later broadcast. `/update_weights_from_distributed`
takes one name, dtype and shape per tensor (SGLang zipped lists of other lengths silently: the trainer's extra
broadcasts then went to the next update), known dtypes, shapes of the served checkpoint (SGLang loaded tensors until
one failed: partly updated weights; an unknown name was skipped and reported as a success) and an initialised group;
`/destroy_weights_update_group` an initialised group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from datetime import timedelta

from sparrow_sgl.sglang.state_routes import layout_problem, served_layout
from sparrow_sgl.sglang.validation import is_int, public_message, quote

ENV_WAIT = "SPARROW_WEIGHTS_GROUP_WAIT_S"
ENV_TIMEOUT = "SPARROW_WEIGHTS_GROUP_TIMEOUT_S"
DEFAULT_WAIT_S = 60.0
DEFAULT_TIMEOUT_S = 600.0
BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")  # torch's process-group backends
PROBE_INTERVAL_S = 0.25
GROUPS: set[str] = set()  # group names initialised or being initialised (HTTP process: the one TokenizerManager)


def env_seconds(name: str, default: float) -> float:
    """A positive, finite number of seconds from the environment."""
    text = os.environ.get(name, "")
    try:
        value = float(text) if text.strip() else default
    except ValueError:
        value = -1.0
    if not 0.0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {text!r}")
    return value


def check_env() -> None:
    """Both settings, read when the server launches: a bad value stops it there, not at the first weight sync."""
    env_seconds(ENV_WAIT, DEFAULT_WAIT_S)
    env_seconds(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)


# -- /init_weights_update_group (HTTP process) --------------------------------------------------------------------
async def check_group_init(original, manager, obj, *args, **kwargs):
    """AROUND hook of `TokenizerManager.init_weights_update_group(obj, request)` -> (success, message)."""
    problem = init_problem(obj, manager.server_args.tp_size, manager.server_args.device)
    if problem is not None:
        return False, problem
    GROUPS.add(obj.group_name)  # reserved before the first await: a concurrent init of the same name is refused
    joined = False
    try:
        problem = await master_problem(obj.master_address, obj.master_port, env_seconds(ENV_WAIT, DEFAULT_WAIT_S))
        if problem is not None:
            return False, problem
        joined, message = await original(manager, obj, *args, **kwargs)
        return joined, public_message(message)
    finally:
        if not joined:
            GROUPS.discard(obj.group_name)


def init_problem(obj, tp_size: int, device: str) -> str | None:
    """Why the server must not try to join this group, or None (the master's reachability aside)."""
    return (
        address_problem(obj.master_address)
        or int_problem("master_port", obj.master_port, 1, 65535)
        or int_problem("world_size", obj.world_size, 1 + tp_size, None, "rank 0 is the trainer's")
        or int_problem("rank_offset", obj.rank_offset, 1, obj.world_size - tp_size, rank_room(obj.world_size, tp_size))
        or new_group_problem(obj.group_name)
        or backend_problem(obj.backend, device)
    )


def rank_room(world_size: int, tp_size: int) -> str:
    return f"rank 0 is the trainer's; this server's {tp_size} rank(s) must fit in world_size {world_size}"


def address_problem(address) -> str | None:
    if not isinstance(address, str) or not address.strip():
        return f"master_address must be a host name or IP address, got {quote(address)}"
    return None


def int_problem(field: str, value, low: int, high: int | None, why: str = "") -> str | None:
    if is_int(value) and low <= value and (high is None or value <= high):
        return None
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    return f"{field} must be an integer {bound}{f' ({why})' if why else ''}, got {quote(value)}"


def new_group_problem(name) -> str | None:
    if not isinstance(name, str) or not name:
        return f"group_name must be a non-empty string, got {quote(name)}"
    if name in GROUPS:
        return f"group_name {name!r} is already initialised; /destroy_weights_update_group it first"
    return None


def backend_problem(backend, device: str) -> str | None:
    import torch.distributed as dist

    usable = [b for b in BACKENDS if getattr(dist, f"is_{b}_available", lambda: False)()]
    if device == "cpu" and "nccl" in usable:
        usable.remove("nccl")  # the CUDA build says NCCL is there; a CPU server cannot run it
    if backend not in usable:
        return f"backend {quote(backend)} is not usable on this {device} server; use one of {', '.join(usable)}"
    return None


async def master_problem(address: str, port: int, wait_s: float) -> str | None:
    """None once (address, port) accepts a TCP connection; a refusal at once for a host name that does not resolve,
    after `wait_s` seconds of tries when nothing listens. The event loop serves other requests meanwhile."""
    host = address[1:-1] if address.startswith("[") and address.endswith("]") else address  # as SGLang's [::1]
    loop = asyncio.get_running_loop()
    try:
        await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return f"master_address {address!r} does not resolve ({getattr(e, 'strerror', None) or e})"
    deadline = loop.time() + wait_s
    while not await accepts(host, port, timeout=max(0.1, min(1.0, deadline - loop.time()))):
        if loop.time() >= deadline:
            return f"no process group master listening at {address}:{port} after {wait_s:g} s"
        await asyncio.sleep(PROBE_INTERVAL_S)
    return None


async def accepts(host: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


# -- /destroy_weights_update_group and /update_weights_from_distributed (HTTP process) ------------------------------
async def check_group_destroy(original, manager, obj, *args, **kwargs):
    """AROUND hook of `TokenizerManager.destroy_weights_update_group(obj, request)` -> (success, message)."""
    if obj.group_name not in GROUPS:
        return False, f"no weights-update group {quote(obj.group_name)} to destroy ({initialised()})"
    success, message = await original(manager, obj, *args, **kwargs)
    if success:
        GROUPS.discard(obj.group_name)
    return success, public_message(message)


async def check_distributed_update(original, manager, obj, *args, **kwargs):
    """AROUND hook of `TokenizerManager.update_weights_from_distributed(obj, request)` -> (success, message)."""
    layout = served_layout(manager.server_args.model_path, manager.model_config.hf_config)
    problem = group_problem(obj.group_name) or tensor_lists_problem(obj.names, obj.dtypes, obj.shapes, layout)
    if problem is not None:
        return False, f"update_weights_from_distributed: {problem}; no weight was changed"
    success, message = await original(manager, obj, *args, **kwargs)
    return success, public_message(message)


def group_problem(name) -> str | None:
    if name not in GROUPS:
        return f"group_name {quote(name)} is no initialised weights-update group ({initialised()})"
    return None


def initialised() -> str:
    return f"initialised: {', '.join(map(repr, sorted(GROUPS)))}" if GROUPS else "none is initialised"


def tensor_lists_problem(names, dtypes, shapes, layout: dict) -> str | None:
    """One (name, dtype, shape) per tensor the trainer broadcasts, each a tensor of the served checkpoint (its
    safetensors layout; empty: not checked)."""
    lists = {"names": names, "dtypes": dtypes, "shapes": shapes}
    if not all(isinstance(v, list) for v in lists.values()) or len({len(v) for v in lists.values()}) != 1:
        sizes = ", ".join(f"{k} {len(v) if isinstance(v, list) else quote(v)}" for k, v in lists.items())
        return f"names, dtypes and shapes must be lists of one entry per tensor, got {sizes}"
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):
        problem = spec_problem(i, name, dtype, shape, layout)
        if problem is not None:
            return problem
    return None


def spec_problem(i: int, name, dtype, shape, layout: dict) -> str | None:
    import torch

    if not isinstance(name, str):
        return f"names[{i}] must be a string, got {quote(name)}"
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        return f"dtypes[{i}] {quote(dtype)} is no torch dtype name (e.g. 'bfloat16', 'float16', 'float32')"
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        return f"shapes[{i}] must be a list of non-negative integers, got {quote(shape)}"
    if not layout:
        return None
    return layout_problem(name, tuple(shape), getattr(torch, dtype), layout)


# -- scheduler side ------------------------------------------------------------------------------------------------
def bounded_group_init(original, *args, timeout=None, **kwargs):
    """AROUND hook of SGLang's `init_custom_process_group`: the weights-update group passes no timeout (and its
    request has no field for one), so torch's default of 30 min bounded the rendezvous and every broadcast of the
    group; now `SPARROW_WEIGHTS_GROUP_TIMEOUT_S`. SGLang's hook registry patches every module's reference, so the
    remote-instance weight groups (`weight_exporter.py`, `connector/remote_instance.py`) get the same bound."""
    if timeout is None:
        timeout = timedelta(seconds=env_seconds(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
    return original(*args, timeout=timeout, **kwargs)


def guard_group_init(original, updater, *args, **kwargs):
    """AROUND hook of the scheduler's `WeightUpdater.init_weights_update_group`: its asserts (an empty group name)
    raised outside its own try and killed the scheduler; now a failed init (400)."""
    try:
        return original(updater, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- anything raised here would take the whole server down
        return False, public_message(f"the weights-update group was not initialised: {type(e).__name__}: {e}")
