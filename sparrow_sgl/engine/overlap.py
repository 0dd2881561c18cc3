"""Overlapped decoding: the next decode step of the same requests is launched before the host reads this one's tokens.

A sampling decode step on the GPU is one replay of a CUDA graph whose sampled tokens stay on the device; the host
then spends 0.5-1.1 ms a step on an H200 (reading the tokens back, appending them, stop checks, drawing the next
uniforms, building the next inputs) while the GPU would idle. With overlap, step N+1 is launched with step N's tokens
fed from the device (vLLM's and SGLang's overlap schedulers do the same), so that host work runs while the GPU
decodes (bench/results/NOTES.md, "Overlapped decoding").

What step N+1 cannot know: which requests step N stopped (EOS or a stop token). Their row of step N+1 is computed
and discarded (it writes only the request's own KV pages, freed once step N+1 is done). Requests that reach their
length at step N are known in advance and end the chain instead. A chain also ends when any request stops, so the
scheduler can admit waiting requests. Tokens are unchanged: every request still draws its uniforms from its own
generator in token order (a discarded row's draw comes after the request's last token).

`SPARROW_OVERLAP` = auto (default: where the step samples inside the CUDA graph with the Triton kernels) | 1 (every
generate decode step, also on the CPU, where the "next" step simply runs after this one: tests) | 0 (never).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparrow_sgl.engine.sampler import SampleOutput, Sampler
from sparrow_sgl.engine.sequence import Sequence

if TYPE_CHECKING:
    from sparrow_sgl.engine.cuda_graph import PendingSample

OVERLAP_ENV = "SPARROW_OVERLAP"
MODES = ("auto", "1", "0")


def overlap_mode() -> str:
    mode = os.environ.get(OVERLAP_ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{OVERLAP_ENV}={mode!r}: choose one of {MODES}")
    return mode


@dataclass
class DecodeLaunch:
    """One generate decode step of `seqs`, launched: `pending` (a GPU step sampled in its graph, read on demand)
    or `ready` (sampled on the host at launch: token ids, log-probs, top-k, and attended KV tokens per row)."""

    seqs: list[Sequence]
    pending: PendingSample | None = None
    ready: tuple[SampleOutput, list[float]] | None = None
    topk: int = 0  # the packed top-k width of a GPU step

    def result(self) -> tuple[SampleOutput, list[float]]:
        if self.ready is None:
            packed = self.pending.rows()  # waits for this step only
            self.ready = Sampler.unpack(packed, self.seqs, self.topk, first=3), [row[2] for row in packed]
        return self.ready

    def can_feed_next(self) -> bool:
        """Whether the next step can start before this one is read: `SPARROW_OVERLAP`, and every request still has
        a token to generate after this step's (the host does not know yet which ones this step stops)."""
        mode = overlap_mode()
        if mode == "0" or (mode == "auto" and not (self.pending is not None and self.pending.chainable)):
            return False
        return all(not s.is_finished and len(s.output_ids) + 1 < s.max_new_tokens for s in self.seqs)
