"""Fast implementations of the ``formats`` operations, and the registry that picks one per device.

A backend (the :class:`Backend` protocol says exactly what the quantized linear layer calls) has
the exact semantics of :mod:`rayfp4.formats`:

- ``quantize_nvfp4(x, tile, rounding, rht, generator, amax, write_gemm_operand, *,
  scale_selection, error_metric, scale_cap) -> NVFP4Tensor`` (the last three: Four Over Six) and
  ``amaxes(xt, rht)``, the tensor amaxes of x and of x^T's Wgrad operand from one read;
- ``quantize_mxfp4(x, tile, rounding, rht, generator, scale_rule) -> MXFP4Tensor``;
- ``quantize_ms_eden(x, hadamard, signs, generator, amax) -> NVFP4Tensor`` (MS-EDEN backward
  operands);
- ``gemm(a, b, out_dtype) -> Tensor``: ``a @ b.T`` of two quantized operands quantized along the
  same K, FP32 accumulation, the tensor factors applied once in FP32, one rounding to out_dtype
  (:func:`rayfp4.formats.quantized.emulated_gemm` up to the FP32 summation order);
- ``propagates_nonfinite``: whether NaN/Inf input gives NaN out instead of an error.

``reference`` (pure torch, any device) is always there; faster backends (``triton``,
``cutlass``) register themselves when their module imports and say per device whether they can
run. ``resolve("auto", device)`` picks the best available one; asking for a backend that cannot
run on the device raises :class:`BackendUnavailable` with the reason.
"""

from __future__ import annotations

from .registry import (
    HOPPER_PREFERENCE,
    PREFERENCE,
    Backend,
    BackendUnavailable,
    available_backends,
    register,
    resolve,
)
from .cutlass import CutlassBackend
from .reference import ReferenceBackend
from .triton_nvfp4 import TritonBackend

# Importing triton_nvfp4 does not import triton (that happens at the first kernel launch), so the
# registration costs nothing where the backend cannot run and leaves TRITON_INTERPRET unfixed.
# The CUTLASS backend loads its libraries only when asked whether it can run on a CUDA device.
register(TritonBackend())
register(CutlassBackend())

__all__ = [
    "Backend",
    "BackendUnavailable",
    "CutlassBackend",
    "HOPPER_PREFERENCE",
    "PREFERENCE",
    "ReferenceBackend",
    "TritonBackend",
    "available_backends",
    "register",
    "resolve",
]
