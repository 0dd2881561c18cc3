"""A process pool whose stuck workers are killed: `map` with a per-item wall-clock timeout.

`concurrent.futures.ProcessPoolExecutor` cannot cancel a running task, and math-verify's own timeout uses SIGALRM,
which works only in the main thread and cannot interrupt C code (a huge sympy power). Here every item runs in a
worker process; an item that overruns its timeout gets its worker SIGKILLed and replaced, and yields `on_timeout`.

Workers are fresh interpreters (`python -m rewards.pool module:function`) talking length-prefixed pickles over
their stdin/stdout: no fork of a threaded parent, no re-import of the caller's `__main__` as spawn/forkserver do.
"""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, BinaryIO

_HEADER = struct.Struct("<Q")
_READY_TIMEOUT_S = 60.0
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _recv(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("worker closed its pipe")
    (n,) = _HEADER.unpack(header)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("worker closed its pipe mid-message")
    return pickle.loads(data)


@dataclass(slots=True)
class _Worker:
    proc: subprocess.Popen
    index: int = -1  # item being processed, -1 when idle
    deadline: float = 0.0


class KillablePool:
    """`workers` processes running `target` ("module:function") on picklable items; one `map` at a time."""

    def __init__(self, target: str, workers: int | None = None, memory_mb: int | None = None):
        module, _, name = target.partition(":")
        if not module or not name:
            raise ValueError(f"target must look like 'package.module:function', got {target!r}")
        self.target = target
        self.memory_mb = memory_mb  # RLIMIT_AS of each worker: a runaway item dies alone (MemoryError)
        self.workers = max(1, workers or min(os.cpu_count() or 1, 8))
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()

    def _spawn(self) -> _Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "rewards.pool", self.target, str(self.memory_mb or 0)]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, start_new_session=True)
        return _Worker(proc)

    def _start(self, n: int) -> list[_Worker]:
        """n workers that have imported the target (import time, ~1 s for sympy, counts against no item)."""
        workers = [self._spawn() for _ in range(n)]
        for w in workers:
            ready = wait([w.proc.stdout], timeout=_READY_TIMEOUT_S)
            try:
                if not ready or _recv(w.proc.stdout) != "ready":
                    raise EOFError
            except (EOFError, OSError, pickle.UnpicklingError):
                for x in workers:
                    self._kill(x)
                raise RuntimeError(f"pool worker for {self.target} did not start within {_READY_TIMEOUT_S:g} s "
                                   f"(exit code {w.proc.poll()}); see its stderr above") from None
        return workers

    @staticmethod
    def _kill(w: _Worker) -> None:
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()
        for stream in (w.proc.stdin, w.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _replace(self, w: _Worker) -> None:
        self._kill(w)
        slot = next(i for i, x in enumerate(self._pool) if x is w)
        self._pool[slot] = self._start(1)[0]

    def map(self, items: Sequence[Any], timeout_s: float, on_timeout: Callable[[Any], Any],
            on_error: Callable[[Any, str], Any]) -> list[Any]:
        """target(item) for every item, in order; `on_timeout(item)` / `on_error(item, message)` stand in for
        items whose worker overran `timeout_s` seconds or failed."""
        with self._lock:
            self._pool += self._start(min(self.workers, len(items)) - len(self._pool))
            results: list[Any] = [None] * len(items)
            todo = deque(range(len(items)))
            busy: dict[Any, _Worker] = {}
            while todo or busy:
                for w in self._pool:
                    if w.index < 0 and todo:
                        self._assign(w, todo.popleft(), items, timeout_s, busy, results, on_error)
                if not busy:
                    continue
                next_deadline = min(w.deadline for w in busy.values())
                for stream in wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic())):
                    w = busy.pop(stream)
                    try:
                        ok, value = _recv(stream)
                        results[w.index] = value if ok else on_error(items[w.index], value)
                        w.index = -1
                    except (EOFError, OSError, pickle.UnpicklingError):
                        results[w.index] = on_error(items[w.index], f"worker process died (exit {w.proc.poll()})")
                        self._replace(w)
                now = time.monotonic()
                for stream, w in list(busy.items()):
                    if w.deadline <= now:
                        del busy[stream]
                        results[w.index] = on_timeout(items[w.index])
                        self._replace(w)
            return results

    def _assign(self, w: _Worker, index: int, items: Sequence[Any], timeout_s: float, busy: dict,
                results: list, on_error: Callable[[Any, str], Any]) -> None:
        w.index, w.deadline = index, time.monotonic() + timeout_s
        try:
            _send(w.proc.stdin, items[index])
            busy[w.proc.stdout] = w
        except (BrokenPipeError, OSError):
            results[index] = on_error(items[index], "worker process died before taking the item")
            self._replace(w)

    def close(self) -> None:
        with self._lock:
            for w in self._pool:
                self._kill(w)
            self._pool.clear()

    def __enter__(self) -> KillablePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(target: str, memory_mb: int) -> None:
    if memory_mb > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    inp, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints of the function go to stderr, not into the protocol stream
    sys.stdout = sys.stderr
    if hasattr(fn, "warmup"):
        fn.warmup()
    _send(out, "ready")
    while True:
        try:
            item = _recv(inp)
        except EOFError:
            return
        try:
            _send(out, (True, fn(item)))
        except Exception as e:  # the function's own failure is reported; the worker lives on
            _send(out, (False, f"{type(e).__name__}: {e}"))


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
