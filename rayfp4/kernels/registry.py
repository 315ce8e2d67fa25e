"""The backend registry: which implementation of the format operations runs on which device."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..formats.mxfp4 import MXFP4Tensor
from ..formats.nvfp4 import NVFP4Tensor
from ..formats.quantized import QuantizedTensor

#: Order in which ``auto`` tries backends: fastest first, the reference always last.
PREFERENCE = ("cutlass", "triton", "reference")
#: The order on Hopper (compute capability 9.x), where both fast backends emulate NVFP4 with BF16
#: GEMMs: the Triton backend's cuBLAS GEMMs are the faster ones there (H200, 337M step: 0.76x BF16
#: against 0.73x for the sm_90a CUTLASS GEMM eagerly; 0.78x, 0.83x with ``gemm_mode: lt``, replayed
#: from graphs; BENCHMARKS.md).
HOPPER_PREFERENCE = ("triton", "cutlass", "reference")
KNOWN = frozenset(PREFERENCE)


class BackendUnavailable(ValueError):
    """A backend was asked for on a device (or installation) where it cannot run."""


@runtime_checkable
class Backend(Protocol):
    """Everything the quantized linear layer asks of a backend. A backend implements all of it,
    the fast paths it does not have included (saying so, e.g. ``amaxes`` returning None)."""

    name: str

    #: True when NaN/Inf input to the quantizers (``quantize_nvfp4``, ``quantize_mxfp4``,
    #: ``quantize_ms_eden``) yields NaN scales and so NaN outputs instead of an error (no host
    #: sync); False when they raise, so that callers must check finiteness first.
    propagates_nonfinite: bool

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else a sentence saying why not."""

    def amaxes(self, xt: torch.Tensor, rht: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For ``xt`` = x^T: (NVFP4 tensor amax of x, of x^T's Wgrad operand -- after the RHT when
        ``rht``) from one read of x, as device tensors ``quantize_nvfp4`` accepts as ``amax``
        without a host sync; (None, None) when the backend has no such pass."""

    def quantize_nvfp4(self, x, tile, rounding, rht, generator, amax=None,
                       write_gemm_operand: bool | None = None, *, scale_selection: str = "max6",
                       error_metric: str = "mse", scale_cap: float | None = None) -> NVFP4Tensor:
        """:func:`rayfp4.formats.nvfp4.quantize` (bit for bit; SR streams may differ).
        ``write_gemm_operand`` asks a fast quantizer to also write the BF16 GEMM operand
        (``gemm_operand``) in the same pass: True / False, or None for the backend's default.
        ``scale_selection``, ``error_metric``, ``scale_cap``: the block-scale rule (Four Over Six),
        as in :func:`rayfp4.formats.nvfp4.quantize`."""

    def quantize_mxfp4(self, x, tile, rounding, rht, generator, scale_rule: str = "ceil") -> MXFP4Tensor:
        """:func:`rayfp4.formats.mxfp4.quantize`."""

    def quantize_ms_eden(self, x, hadamard: int, signs: torch.Tensor, generator, amax=None) -> NVFP4Tensor:
        """:func:`rayfp4.formats.ms_eden.quantize` (bit for bit given the same uniform draws; the
        draws themselves may differ between backends)."""

    def dequantize(self, t: QuantizedTensor) -> torch.Tensor:
        """``t.dequantize(torch.float32)``, bit for bit: the values a quantized operand stands for
        (MS-EDEN's backward re-quantizes the forward operands from them)."""

    def gemm(self, a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``a @ b.T`` of two operands quantized along the same K: FP32 accumulation, the tensor
        factors applied once in FP32, one rounding to ``out_dtype``
        (:func:`rayfp4.formats.quantized.emulated_gemm` up to the FP32 summation order)."""


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    if backend.name not in KNOWN:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {sorted(KNOWN)}")
    if not isinstance(backend, Backend):
        members = [m for m in (*Backend.__annotations__, *vars(Backend)) if not m.startswith("_")]
        missing = ", ".join(m for m in members if not hasattr(backend, m))
        raise TypeError(f"backend {backend.name!r} does not implement the Backend protocol: no {missing}")
    _BACKENDS[backend.name] = backend


def preference(device: torch.device | str) -> tuple[str, ...]:
    """The order ``auto`` tries backends in on ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return HOPPER_PREFERENCE
    return PREFERENCE


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [n for n in preference(device) if n in _BACKENDS and _BACKENDS[n].unavailable_reason(device) is None]


def resolve(name: str, device: torch.device | str) -> Backend:
    """The backend ``name`` (or the best available for ``auto``) for ``device``."""
    device = torch.device(device)
    if name == "auto":
        return _BACKENDS[available_backends(device)[0]]
    if name not in KNOWN:
        raise BackendUnavailable(f"unknown GEMM backend {name!r}; expected auto, {', '.join(PREFERENCE)}")
    if name not in _BACKENDS:
        raise BackendUnavailable(f"backend {name!r} is not part of this installation of rayfp4 yet; "
                                 f"available on {device}: {', '.join(available_backends(device))}")
    why = _BACKENDS[name].unavailable_reason(device)
    if why:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device}: {why}")
    return _BACKENDS[name]
