"""The reference backend: ``rayfp4.formats`` itself, on any device.

Its quantizers are ``nvfp4.quantize`` / ``mxfp4.quantize`` and its GEMM is
:func:`rayfp4.formats.quantized.emulated_gemm`, the definition every faster backend is checked
against. It has none of the fast paths a backend may offer (shared amax passes, a BF16 operand
written while quantizing), and says so explicitly.
"""

from __future__ import annotations

import torch

from ..formats import ms_eden, mxfp4, nvfp4
from ..formats.quantized import emulated_gemm
from .registry import register


class ReferenceBackend:
    name = "reference"
    propagates_nonfinite = False  # formats.quantize raises on NaN/Inf; callers check first

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def amaxes(self, xt, rht: bool):
        # No shared amax pass: each quantization measures its own amax.
        return None, None

    def quantize_nvfp4(self, x, tile, rounding, rht, generator, amax=None, write_gemm_operand=None, *,
                       scale_selection="max6", error_metric="mse", scale_cap=None):
        # write_gemm_operand asks a fast quantizer for the BF16 operand too; nothing to write here.
        return nvfp4.quantize(x, tile=tile, rounding=rounding, rht=rht, generator=generator, amax=amax,
                              scale_selection=scale_selection, error_metric=error_metric, scale_cap=scale_cap)

    def quantize_mxfp4(self, x, tile, rounding, rht, generator, scale_rule="ceil"):
        return mxfp4.quantize(x, tile=tile, rounding=rounding, rht=rht, generator=generator, scale_rule=scale_rule)

    def quantize_ms_eden(self, x, hadamard, signs, generator, amax=None):
        return ms_eden.quantize(x, hadamard=hadamard, signs=signs, generator=generator, amax=amax)

    def dequantize(self, t):
        return t.dequantize(torch.float32)

    def gemm(self, a, b, out_dtype: torch.dtype) -> torch.Tensor:
        return emulated_gemm(a, b, out_dtype)


register(ReferenceBackend())
