"""Pool targets for the reward tests (run inside `rewards.pool` worker processes; tests put this dir on PYTHONPATH).

`rendezvous` proves overlap without timing thresholds: an item returns reached=True only if `needed` items had
started (each drops a file in `folder`) while it was still running, which a serialized pool can never do for its
first items.
"""

import os
import time
import uuid


def rendezvous(item: tuple[str, int, float]) -> tuple[int, bool]:
    folder, needed, cap_s = item
    open(os.path.join(folder, uuid.uuid4().hex), "w").close()
    give_up = time.monotonic() + cap_s
    while time.monotonic() < give_up:
        if len(os.listdir(folder)) >= needed:
            return os.getpid(), True
        time.sleep(0.02)
    return os.getpid(), False


def slow_verify(pair: tuple[str, str]) -> tuple[float, str]:
    """rewards.math's verifier after a rendezvous of 2 items in $SPARROW_PROBE_DIR; the reason says if it met."""
    from rewards.math import _verify_pair

    _, reached = rendezvous((os.environ["SPARROW_PROBE_DIR"], 2, 120.0))  # generous: workers start on a busy box
    score, reason = _verify_pair(pair)
    return score, f"{reason}; rendezvous={'met' if reached else 'missed'}"


slow_verify.warmup = lambda: __import__("rewards.math", fromlist=["_verify_pair"])._verify_pair.warmup()
