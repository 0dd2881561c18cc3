"""Collects the one-sample `generate` calls OpenRLHF's executor makes concurrently into engine batches.

OpenRLHF's executor awaits `llm_engine.generate(prompt_ids, params)` once per sample (many at a time); an engine
is fastest given the whole batch at once. Requests that arrive within `window_s` of each other and share sampling
settings run as one `run_batch(prompts, params)` call in a worker thread; one batch runs at a time, and none starts
while the gate is closed (paused generation, weights being replaced).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field

# Per-sample side channel: the rollout actor sets a dict for each executor task, `generate` fills it with the
# engine's extras (sparse statistics, top-k lists) that OpenRLHF's response dict has no field for. (A module-level
# name: Ray pickles actor methods by value, and a ContextVar does not pickle.)
sample_extras: contextvars.ContextVar[dict | None] = contextvars.ContextVar("sparrow_sample_extras", default=None)


@dataclass
class _Request:
    key: tuple
    prompt: list[int]
    params: object
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, run_batch: Callable[[list[list[int]], object], list], window_s: float = 0.02) -> None:
        self.run_batch = run_batch
        self.window_s = window_s
        self.lock = asyncio.Lock()  # held while a batch runs; weight updates take it too
        self.gate = asyncio.Event()
        self.gate.set()
        self._pending: list[_Request] = []
        self._running = 0
        self._loop_task: asyncio.Task | None = None

    @property
    def num_unfinished(self) -> int:
        return len(self._pending) + self._running

    async def submit(self, prompt: list[int], params, key: tuple):
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(key, list(prompt), params, future))
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(self.window_s)
            await self.gate.wait()
            key = self._pending[0].key
            batch = [r for r in self._pending if r.key == key]
            self._pending = [r for r in self._pending if r.key != key]
            async with self.lock:
                self._running = len(batch)
                try:
                    results = await asyncio.to_thread(self.run_batch, [r.prompt for r in batch], batch[0].params)
                except Exception as e:  # every waiting request sees the engine's error
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(e)
                    continue
                finally:
                    self._running = 0
            for r, out in zip(batch, results, strict=True):
                if not r.future.done():
                    r.future.set_result(out)
