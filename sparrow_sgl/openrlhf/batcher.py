"""Collects the one-sample `generate` calls OpenRLHF's executor makes concurrently into engine batches.

OpenRLHF's executor awaits `llm_engine.generate(prompt_ids, params)` once per sample (many at a time); an engine
is fastest given the whole batch at once. Requests that share sampling settings run as one `run_batch(prompts,
params)` call in a worker thread; one batch runs at a time, and none starts while the gate is closed (paused
generation, weights being replaced).

When a batch starts: OpenRLHF sends a step's prompts one `generate_responses` RPC at a time, and on an H200 the four
RPCs of a 4-prompt step arrived over 85-230 ms, so a fixed 20 ms window split every rollout into two batches run one
after another (issue 20's colocated run). With `expect` (the samples one engine gets per step) the batch starts as
soon as that many requests of its settings are waiting, or, once `expect_min` are (an engine given one prompt fewer
than the busiest: OpenRLHF balances prompts over engines), after `quiet_s` with no new request; without `expect`,
after `quiet_s` with no new request. Either way it starts at the latest `max_wait_s` after its first request (a
short last step, evaluation prompts).
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
    def __init__(self, run_batch: Callable[[list[list[int]], object], list], *, expect: int = 0,
                 expect_min: int | None = None, quiet_s: float = 0.25, max_wait_s: float = 2.0,
                 poll_s: float = 0.005) -> None:
        expect_min = expect if expect_min is None else expect_min
        bad_expect = not 0 <= expect_min <= expect if expect else expect_min != 0
        if bad_expect or not 0 < poll_s <= quiet_s <= max_wait_s:
            raise ValueError(f"Batcher needs 0 <= expect_min <= expect (expect_min 0 without expect) and 0 < poll_s "
                             f"<= quiet_s <= max_wait_s, got expect={expect}, expect_min={expect_min}, "
                             f"poll_s={poll_s}, quiet_s={quiet_s}, max_wait_s={max_wait_s}")
        self.run_batch = run_batch
        self.expect, self.expect_min = expect, expect_min
        self.quiet_s, self.max_wait_s, self.poll_s = quiet_s, max_wait_s, poll_s
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

    async def _gather(self) -> None:
        """Return when the next batch should start (module docstring)."""
        loop = asyncio.get_running_loop()
        start = last_change = loop.time()
        seen = len(self._pending)
        while loop.time() - start < self.max_wait_s:
            await asyncio.sleep(self.poll_s)
            now, key = loop.time(), self._pending[0].key
            ready = sum(r.key == key for r in self._pending)
            if self.expect and ready >= self.expect:
                return
            if len(self._pending) != seen:
                seen, last_change = len(self._pending), now
            elif now - last_change >= self.quiet_s and ready >= self.expect_min:
                return

    async def _drain(self) -> None:
        while self._pending:
            await self._gather()
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
