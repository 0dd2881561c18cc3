"""Page allocation: per-request block tables, ref-counted prompt pages shared by the samples of a prompt.

A group of n samples is allocated its worst case up front (prompt + max_new_tokens), so a running request never
waits for memory and nothing is ever preempted. Full prompt pages are shared (ref count n); each sample owns the
rest, and the last, partial prompt page is copied from the leader into every other sample's own page after the
prefill (copy-on-write done eagerly: every sample writes into that page at its first decode step).
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        self.free_pages: deque[int] = deque(range(num_pages))
        self.ref_counts = [0] * num_pages
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self.free_pages)

    def reset_peak(self) -> None:
        self.peak_used = self.num_used

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def group_pages(self, prompt_len: int, n: int, kv_capacity: int) -> int:
        """Pages a group of n samples needs: shared full prompt pages + each sample's own pages."""
        shared = prompt_len // self.page_size
        return shared + n * (self.pages_for(kv_capacity) - shared)

    def can_allocate(self, pages: int) -> bool:
        return pages <= len(self.free_pages)

    def allocate_group(
        self, prompt_len: int, n: int, kv_capacity: int
    ) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Block tables of the n samples and the (src, dst) page copies to run once the leader's prefill is done."""
        need = self.group_pages(prompt_len, n, kv_capacity)
        if not self.can_allocate(need):
            raise RuntimeError(f"allocating {need} pages with only {self.num_free} free")
        shared = [self._take(n) for _ in range(prompt_len // self.page_size)]
        own = self.pages_for(kv_capacity) - len(shared)
        tables = [shared + [self._take(1) for _ in range(own)] for _ in range(n)]
        copies = []
        if prompt_len % self.page_size:
            partial = len(shared)
            copies = [(tables[0][partial], table[partial]) for table in tables[1:]]
        self.peak_used = max(self.peak_used, self.num_used)
        return tables, copies

    def free(self, table: list[int]) -> None:
        for page in table:
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self.free_pages.append(page)
        table.clear()

    def _take(self, refs: int) -> int:
        page = self.free_pages.popleft()
        self.ref_counts[page] = refs
        return page
