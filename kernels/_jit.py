"""@triton.jit helpers shared by the kernel modules (imports triton; the kernel modules only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import interpreting


@triton.jit
def mma(
    a,  # [M, K] tile
    b,  # [K, N] tile, same dtype as a
    acc,  # [M, N] float32 accumulator
    DOT_F32: tl.constexpr,  # multiply through fp32 (interpreter only, see dot_f32())
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 tiles (no tf32), "tf32" otherwise (then ignored)
):
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots: an fp32 call is the accuracy reference, not tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_f32(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 bits (garbage), so
    under the interpreter bf16 tiles are widened to fp32 first. Exact either way: a bf16×bf16
    product fits in fp32, and tensor cores accumulate bf16 products in fp32 too."""
    return interpreting() and dtype == torch.bfloat16
