"""The reference backend: ``rayfp4.formats`` itself, and the exact emulated block-scaled GEMM.

Every E2M1 value times every E4M3 (or power-of-two) block scale is exact in BF16, FP32 and even
TF32, so multiplying the dequantized operands *without* their tensor factors, accumulating in
FP32 and applying ``alpha = (amax_a / 2688) * (amax_b / 2688)`` once in FP32 computes what a
Blackwell block-scaled MMA computes, up to the FP32 summation order.
"""

from __future__ import annotations

import torch

from ..formats import mxfp4, nvfp4
from ..formats.nvfp4 import global_decode_scale
from .registry import register


def gemm_alpha(a, b) -> torch.Tensor:
    """The FP32 factor applied after the GEMM: the product of both tensors' decode factors."""
    fa = global_decode_scale(a.amax) if isinstance(a, nvfp4.NVFP4Tensor) else None
    fb = global_decode_scale(b.amax) if isinstance(b, nvfp4.NVFP4Tensor) else None
    if fa is None and fb is None:
        return torch.ones((), dtype=torch.float32, device=a.device)
    if fa is None or fb is None:
        raise ValueError("cannot multiply an NVFP4 operand with an MXFP4 operand")
    return fa * fb


def emulated_gemm(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b.T`` for quantized a [M, K] and b [N, K]: FP32 accumulation, alpha in FP32."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"GEMM operands disagree on K: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    acc = a.dequantize_unscaled(torch.float32) @ b.dequantize_unscaled(torch.float32).t()
    return (acc * gemm_alpha(a, b)).to(out_dtype)


class ReferenceBackend:
    name = "reference"
    propagates_nonfinite = False  # formats.quantize raises on NaN/Inf; callers check first

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def quantize_nvfp4(self, x, tile, rounding, rht, generator, amax=None, bf16_operand=None):
        # bf16_operand: a fast backend's hint (write the GEMM operand too); nothing to do here.
        return nvfp4.quantize(x, tile=tile, rounding=rounding, rht=rht, generator=generator, amax=amax)

    def quantize_mxfp4(self, x, tile, rounding, rht, generator, scale_rule="ceil"):
        return mxfp4.quantize(x, tile=tile, rounding=rounding, rht=rht, generator=generator, scale_rule=scale_rule)

    def gemm(self, a, b, out_dtype: torch.dtype) -> torch.Tensor:
        return emulated_gemm(a, b, out_dtype)


register(ReferenceBackend())
