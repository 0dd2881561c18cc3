"""The dependency primitives of the persistent kernels' in-order work queue (`triton_mlp_block.py`,
`triton_attention_block.py`): a program that finished an item signals a counter or flag in L2 with release order,
and a program whose item depends on earlier items spins on it with acquire order. An item only ever waits for items
earlier in the queue, which programs already running hold, so no grid size can deadlock.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def signal(ptr):
    """Count this program's item as done at `ptr`, after every thread's stores of the item (release)."""
    tl.debug_barrier()
    tl.atomic_add(ptr, 1, sem="release")


@triton.jit
def wait_count(ptr, target):
    """Until the counter at `ptr` reaches `target` (acquire: the counted items' stores are visible)."""
    seen = tl.atomic_add(ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(ptr, 0, sem="acquire")


@triton.jit
def wait_flags(flags_ptr, first, last, BLOCK: tl.constexpr):
    """Until flags[first:last] are all set (last - first <= BLOCK)."""
    idx = first + tl.arange(0, BLOCK)
    valid = idx < last
    ready = tl.min(tl.where(valid, tl.atomic_add(flags_ptr + idx, 0, mask=valid, sem="acquire"), 1), 0)
    while ready == 0:
        ready = tl.min(tl.where(valid, tl.atomic_add(flags_ptr + idx, 0, mask=valid, sem="acquire"), 1), 0)
