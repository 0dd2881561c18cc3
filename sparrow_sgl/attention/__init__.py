"""Engine-agnostic block-sparse decode attention (pure functions on tensors)."""

from sparrow_sgl.attention.attend import attend_pages
from sparrow_sgl.attention.decode import sparse_decode
from sparrow_sgl.attention.pages import PageSummaries, to_hnd
from sparrow_sgl.attention.select import Selection, score_pages, select_pages

__all__ = ["PageSummaries", "Selection", "attend_pages", "score_pages", "select_pages", "sparse_decode", "to_hnd"]
