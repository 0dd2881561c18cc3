"""A process pool whose stuck workers are killed: `map` with a per-item wall-clock timeout, many callers at once.

`concurrent.futures.ProcessPoolExecutor` cannot cancel a running task, and math-verify's own timeout uses SIGALRM,
which works only in the main thread and cannot interrupt C code (a huge sympy power). Here every item runs in a
worker process; an item that overruns its timeout gets its worker SIGKILLed and replaced, and yields `on_timeout`.

Workers are fresh interpreters (`python -m rewards.pool module:function`) talking length-prefixed pickles over
their stdin/stdout: no fork of a threaded parent, no re-import of the caller's `__main__` as spawn/forkserver do.

Concurrency: one dispatcher thread owns the workers. `map` (from any number of threads) queues its items and
waits; the dispatcher hands queued items, first come first served, to idle workers (starting up to `workers`
processes as work arrives, without blocking on their start-up), collects results, and kills overrunning workers.
So concurrent one-item calls (OpenRLHF's reward threads) run on different workers at the same time.
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
from dataclasses import dataclass, field
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


class _Batch:
    """One `map` call: outcomes filled in by the dispatcher, waited on by the caller."""

    def __init__(self, n: int):
        self.outcomes: list[tuple[str, Any] | None] = [None] * n  # ("ok", value) | ("error", msg) | ("timeout", None)
        self.left = n
        self.done = threading.Event()
        self.failure: BaseException | None = None  # the pool itself failed (start-up, close): map raises it
        if n == 0:
            self.done.set()

    def settle(self, index: int, outcome: tuple[str, Any]) -> None:
        if self.outcomes[index] is None:
            self.outcomes[index] = outcome
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        self.failure = self.failure or error
        self.done.set()


@dataclass(slots=True)
class _Job:
    batch: _Batch
    index: int
    item: Any
    timeout_s: float


@dataclass(slots=True)
class _Worker:
    proc: subprocess.Popen
    ready: bool = False
    job: _Job | None = None
    deadline: float = field(default_factory=lambda: time.monotonic() + _READY_TIMEOUT_S)


class KillablePool:
    """`workers` processes running `target` ("module:function") on picklable items; `map` is thread-safe and
    concurrent calls share the workers."""

    def __init__(self, target: str, workers: int | None = None, memory_mb: int | None = None):
        module, _, name = target.partition(":")
        if not module or not name:
            raise ValueError(f"target must look like 'package.module:function', got {target!r}")
        self.target = target
        self.memory_mb = memory_mb  # RLIMIT_AS of each worker: a runaway item dies alone (MemoryError)
        self.workers = max(1, workers or min(os.cpu_count() or 1, 8))
        self._lock = threading.Lock()  # guards _queue, _thread, _closing and the wake-up pipe
        self._queue: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._closing = False
        self._pool: list[_Worker] = []  # dispatcher thread only

    # ---- callers' side -------------------------------------------------------------------------------------
    def map(self, items: Sequence[Any], timeout_s: float, on_timeout: Callable[[Any], Any],
            on_error: Callable[[Any, str], Any]) -> list[Any]:
        """target(item) for every item, in order; `on_timeout(item)` / `on_error(item, message)` stand in for
        items whose worker overran `timeout_s` seconds (counted from when a worker took the item) or failed."""
        batch = _Batch(len(items))
        if items:
            with self._lock:
                self._ensure_dispatcher()
                self._queue.extend(_Job(batch, i, item, timeout_s) for i, item in enumerate(items))
                os.write(self._wake_w, b"x")
        batch.done.wait()
        if batch.failure is not None:
            raise batch.failure
        return [self._result(items[i], outcome, on_timeout, on_error) for i, outcome in enumerate(batch.outcomes)]

    @staticmethod
    def _result(item: Any, outcome: tuple[str, Any], on_timeout: Callable, on_error: Callable) -> Any:
        kind, value = outcome
        if kind == "ok":
            return value
        return on_timeout(item) if kind == "timeout" else on_error(item, value)

    def _ensure_dispatcher(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._closing = False
            self._wake_r, self._wake_w = os.pipe()
            self._thread = threading.Thread(target=self._run, args=(self._wake_r,), name="killable-pool",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Kill every worker; maps still waiting raise RuntimeError. The pool restarts on the next `map`."""
        with self._lock:
            thread, self._closing = self._thread, True
            if thread is not None:
                os.write(self._wake_w, b"x")
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> KillablePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- dispatcher thread ---------------------------------------------------------------------------------
    def _run(self, wake_r: int) -> None:
        error: BaseException = RuntimeError(f"pool for {self.target} was closed")
        try:
            while self._step(wake_r):
                pass
        except BaseException as e:  # a bug here must not leave callers waiting forever
            error = e
        with self._lock:
            self._thread = None
            pending, self._queue = list(self._queue), deque()
            os.close(self._wake_w)
            os.close(wake_r)
        for w in self._pool:
            if w.job is not None:
                w.job.batch.fail(error)
            self._kill(w)
        self._pool.clear()
        for job in pending:
            job.batch.fail(error)

    def _step(self, wake_r: int) -> bool:
        """One round: start workers, hand out jobs, wait for a result/start-up/wake-up/deadline. False: stop."""
        with self._lock:
            if self._closing:
                return False
            self._grow()
            for w in list(self._pool):  # a worker found dead while assigning is replaced in the list
                if w.ready and w.job is None and self._queue:
                    self._assign(w, self._queue.popleft())
        waiting = {w.proc.stdout: w for w in self._pool if w.job is not None or not w.ready}
        next_deadline = min((w.deadline for w in waiting.values()), default=None)
        timeout = None if next_deadline is None else max(0.0, next_deadline - time.monotonic())
        for stream in wait([wake_r, *waiting], timeout=timeout):
            if stream == wake_r:
                os.read(wake_r, 4096)
            else:
                self._collect(waiting[stream])
        now = time.monotonic()
        for w in list(self._pool):
            if w.deadline <= now and (w.job is not None or not w.ready):
                self._expire(w)
        return True

    def _grow(self) -> None:
        """Start workers (not waiting for them) while queued jobs outnumber idle or starting ones."""
        spare = sum(1 for w in self._pool if w.job is None)
        while len(self._pool) < self.workers and len(self._queue) > spare:
            self._pool.append(self._spawn())
            spare += 1

    def _spawn(self) -> _Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "rewards.pool", self.target, str(self.memory_mb or 0)]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                start_new_session=True)
        return _Worker(proc)

    def _assign(self, w: _Worker, job: _Job) -> None:
        w.job, w.deadline = job, time.monotonic() + job.timeout_s
        try:
            _send(w.proc.stdin, job.item)
        except (BrokenPipeError, OSError):
            job.batch.settle(job.index, ("error", "worker process died before taking the item"))
            w.job = None
            self._drop(w, replace=True)

    def _collect(self, w: _Worker) -> None:
        try:
            message = _recv(w.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            if w.ready:
                assert w.job is not None
                w.job.batch.settle(w.job.index, ("error", f"worker process died (exit {w.proc.poll()})"))
                w.job = None
                self._drop(w, replace=True)
            else:
                self._start_failed(w)
            return
        if not w.ready:
            w.ready = message == "ready"
            if not w.ready:
                self._start_failed(w)
            return
        ok, value = message
        assert w.job is not None
        w.job.batch.settle(w.job.index, ("ok", value) if ok else ("error", value))
        w.job = None

    def _expire(self, w: _Worker) -> None:
        if not w.ready:
            self._start_failed(w)
            return
        assert w.job is not None
        w.job.batch.settle(w.job.index, ("timeout", None))
        w.job = None
        self._drop(w, replace=True)

    def _start_failed(self, w: _Worker) -> None:
        """A worker that did not come up: the queued jobs fail (their maps raise) rather than wait forever."""
        code = w.proc.poll()
        self._drop(w)
        error = RuntimeError(f"pool worker for {self.target} did not start within {_READY_TIMEOUT_S:g} s "
                             f"(exit code {code}); see its stderr above")
        with self._lock:
            pending, self._queue = list(self._queue), deque()
        for job in pending:
            job.batch.fail(error)

    def _drop(self, w: _Worker, replace: bool = False) -> None:
        """Kill a worker; `replace` starts its successor now (start-up counts against no item)."""
        self._kill(w)
        self._pool.remove(w)
        if replace:
            self._pool.append(self._spawn())

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
