"""Continuous batching: admit waiting groups (prefill) whenever their worst-case pages fit, else decode the running.

Prefill has priority, as in nano-vllm. Admission is FIFO: the first group that does not fit (pages, max_num_seqs)
blocks the queue until running requests finish, so no request starves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sparrow_sgl.config import ConfigError
from sparrow_sgl.engine.block_manager import BlockManager
from sparrow_sgl.engine.sequence import Sequence, SequenceGroup


@dataclass
class Step:
    is_prefill: bool
    groups: list[SequenceGroup] = field(default_factory=list)  # prefill: admitted groups
    seqs: list[Sequence] = field(default_factory=list)  # decode: running sequences


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_prefill_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[Sequence] = []

    def add(self, group: SequenceGroup) -> None:
        need = self.block_manager.group_pages(group.prompt_len, group.n, group.kv_capacity)
        if need > self.block_manager.num_pages:
            raise ConfigError(
                f"a request of {group.prompt_len} prompt tokens x {group.n} sample(s) needs {need} KV pages "
                f"but the whole pool has {self.block_manager.num_pages}; raise kv_gb or lower max_new_tokens"
            )
        if group.n > self.max_num_seqs:
            raise ConfigError(f"a group of {group.n} samples exceeds max_num_seqs={self.max_num_seqs}")
        self.waiting.append(group)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Step:
        admitted, prefill_tokens, new_seqs = [], 0, 0
        while self.waiting:
            group = self.waiting[0]
            if len(self.running) + new_seqs + group.n > self.max_num_seqs:
                break
            if admitted and prefill_tokens + group.prompt_len > self.max_prefill_tokens:
                break
            need = self.block_manager.group_pages(group.prompt_len, group.n, group.kv_capacity)
            if not self.block_manager.can_allocate(need):
                break
            tables, group.copies = self.block_manager.allocate_group(group.prompt_len, group.n, group.kv_capacity)
            for seq, table in zip(group.seqs, tables):
                seq.block_table = table
            self.waiting.popleft()
            admitted.append(group)
            prefill_tokens += group.prompt_len
            new_seqs += group.n
        if admitted:
            for group in admitted:
                self.running.extend(group.seqs)
            return Step(is_prefill=True, groups=admitted)
        if not self.running:
            raise RuntimeError("scheduler stalled: nothing running and the first waiting request does not fit")
        return Step(is_prefill=False, seqs=list(self.running))

    def finish(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        self.running.remove(seq)
