"""The backend registry: which implementation of the format operations runs on which device."""

from __future__ import annotations

from typing import Protocol

import torch

#: Order in which ``auto`` tries backends: fastest first, the reference always last.
PREFERENCE = ("cutlass", "triton", "reference")
KNOWN = frozenset(PREFERENCE)


class BackendUnavailable(ValueError):
    """A backend was asked for on a device (or installation) where it cannot run."""


class Backend(Protocol):
    name: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else a sentence saying why not."""

    def quantize_nvfp4(self, x, tile, rounding, rht, generator, amax, bf16_operand=None):
        """``bf16_operand`` asks a fast backend to write the BF16 GEMM operand in the same pass."""

    # Optional: ``amaxes(xt, rht) -> (amax of x, amax of the Wgrad operand of x^T)`` from one read
    # of x, as device tensors that ``quantize_nvfp4`` accepts as ``amax`` without a host sync.

    def quantize_mxfp4(self, x, tile, rounding, rht, generator, scale_rule): ...

    def gemm(self, a, b, out_dtype: torch.dtype) -> torch.Tensor: ...


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    if backend.name not in KNOWN:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {sorted(KNOWN)}")
    _BACKENDS[backend.name] = backend


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [n for n in PREFERENCE if n in _BACKENDS and _BACKENDS[n].unavailable_reason(device) is None]


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
