"""The ``cutlass`` backend: CUTLASS-generated GEMMs (``cutlass_kernels``) for the NVFP4 GEMMs.

On compute capability 9.0 (Hopper) it runs the exact emulation through the sm_90a BF16 GEMM with
the FP32 alpha in its epilogue; on 10.0 (Blackwell) the native sm_100a block-scaled NVFP4 GEMM
(built here, never run: no Blackwell GPU was available). Quantization is the Triton backend's
(or the reference where Triton cannot run). All three GEMMs of an NVFP4 layer run on CUTLASS:
Fprop and Dgrad write BF16, Wgrad writes FP32 through the ``_f32out`` kernels (when those are not
built, Wgrad goes to the fallback and ``binding.available`` says so). MXFP4 operands and output
dtypes other than BF16/FP32 go to the fallback.
"""

from __future__ import annotations

import torch

from ..formats.nvfp4 import NVFP4Tensor
from .reference import ReferenceBackend
from .triton_nvfp4 import TritonBackend


class CutlassBackend:
    name = "cutlass"
    propagates_nonfinite = True  # as its quantizer does (Triton on CUDA)

    def __init__(self):
        self._triton = TritonBackend()
        self._reference = ReferenceBackend()
        self._kernel_info: dict[torch.device, tuple[str | None, bool]] = {}

    def _fallback(self, device: torch.device):
        return self._triton if self._triton.unavailable_reason(torch.device(device)) is None else self._reference

    def unavailable_reason(self, device: torch.device) -> str | None:
        try:
            from cutlass_kernels import binding
        except ImportError as e:  # pragma: no cover - the package ships with rayfp4
            return f"cutlass_kernels cannot be imported ({e})"
        av = binding.available(torch.device(device))
        if not av:
            return av.reason
        if self._triton.unavailable_reason(torch.device(device)) is not None:
            return "the CUTLASS path quantizes with the Triton kernels, which cannot run here"
        return None

    def quantize_nvfp4(self, x, tile, rounding, rht, generator, amax=None, write_gemm_operand=None, **selection):
        # selection: scale_selection, error_metric, scale_cap (Four Over Six), passed on as given;
        # generator may be a device seed (triton_nvfp4.quantize_nvfp4), the Triton quantizer's
        return self._fallback(x.device).quantize_nvfp4(x, tile, rounding, rht, generator, amax, write_gemm_operand,
                                                       **selection)

    def amaxes(self, xt, rht: bool):
        return self._fallback(xt.device).amaxes(xt, rht)

    def swiglu_amaxes(self, gate, up, rht: bool):
        # Wherever this backend runs, its quantizers are the Triton ones (unavailable_reason).
        return self._triton.swiglu_amaxes(gate, up, rht)

    def rmsnorm_amaxes(self, x, rstd, weight, rht: bool):
        return self._triton.rmsnorm_amaxes(x, rstd, weight, rht)

    def swiglu_backward_amaxes(self, gate, up, dh, rht: bool):
        return self._triton.swiglu_backward_amaxes(gate, up, dh, rht)

    def quantize_mxfp4(self, x, tile, rounding, rht, generator, scale_rule="ceil"):
        return self._fallback(x.device).quantize_mxfp4(x, tile, rounding, rht, generator, scale_rule)

    def quantize_ms_eden(self, x, hadamard, signs, generator, amax=None):
        return self._fallback(x.device).quantize_ms_eden(x, hadamard, signs, generator, amax)

    def dequantize(self, t):
        return self._fallback(t.device).dequantize(t)

    def _kernels(self, device: torch.device) -> tuple[str | None, bool]:
        """(family, whether the FP32-output Wgrad kernel is built), asked once per device: the
        check reads the build index and the GPU."""
        hit = self._kernel_info.get(device)
        if hit is None:
            from cutlass_kernels import binding

            av = binding.available(device)
            hit = self._kernel_info[device] = (av.family, av.wgrad)
        return hit

    def gemm(self, a, b, out_dtype: torch.dtype) -> torch.Tensor:
        if out_dtype not in (torch.bfloat16, torch.float32) or not isinstance(a, NVFP4Tensor) or not isinstance(b, NVFP4Tensor):
            return self._fallback(a.device).gemm(a, b, out_dtype)
        family, wgrad = self._kernels(a.device)
        if out_dtype == torch.float32 and not wgrad:
            return self._fallback(a.device).gemm(a, b, out_dtype)
        from cutlass_kernels import binding

        from . import triton_nvfp4

        if family == "nvfp4":
            return binding.gemm_nvfp4(a, b, out_dtype=out_dtype)
        # The operands as the Triton quantizers wrote them (or the Triton dequantizer), and alpha in
        # one Triton launch: the values binding's defaults compute, with fewer and faster kernels.
        operands = (triton_nvfp4.dequantize_unscaled(a), triton_nvfp4.dequantize_unscaled(b))
        return binding.gemm_nvfp4_emulated(a, b, operands=operands, alpha=triton_nvfp4.alpha(a, b), out_dtype=out_dtype)
