"""The page centroid as the Triton kernels compute it, equal bit for bit to the torch reference's.

`PageSummaries.centroid` divides the float32 key sum by the count with IEEE rounding; Triton's `/` on float32 is an
approximate division (`div.full`, up to 2 ulp off), so every kernel that writes or scores a centroid divides with
`div_rn`. The "centroid-bf16" scorer rounds that to bf16 to nearest, ties to even, as torch's `.to(torch.bfloat16)`
does; the rounding is done on the bits, because Triton's interpreter (the CPU tests) truncates in its float32 ->
bf16 cast where the GPU rounds.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def page_mean(key_sum, count):
    """key_sum / count in float32, correctly rounded (count: float32, >= 1)."""
    return tl.math.div_rn(key_sum, count)


@triton.jit
def round_to_bf16(x):
    """Finite float32 x rounded to the nearest bf16 (ties to even), returned as float32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def bf16_centroid(key_sum, count):
    """The centroid-bf16 scorer's centroid from float32 sums, as float32."""
    return round_to_bf16(page_mean(key_sum, count))


@triton.jit
def store_centroid(dst, centroid, mask):
    """Store a float32 centroid into a centroid copy of any float dtype; a bf16 copy gets `round_to_bf16`'s value."""
    if dst.dtype.element_ty == tl.bfloat16:
        centroid = round_to_bf16(centroid)
    tl.store(dst, centroid.to(dst.dtype.element_ty), mask=mask)
