"""The quantized-tensor contract shared by NVFP4 and MXFP4, and the one definition of their GEMM.

A :class:`QuantizedTensor` is an [M, K] matrix quantized along K: E2M1 codes, one block scale per
``block`` consecutive elements of a row (for square tiles every row holds its tile's scale), and
for NVFP4 an FP32 tensor scale. Its value is ``e2m1 * block scale * decode factor``, where the
decode factor is the tensor-level part (``amax / 2688`` for NVFP4; MXFP4 has none).

Every E2M1 value times every block scale is exact in BF16 and FP32, so the GEMM of two quantized
operands can multiply the *unscaled* values ``e2m1 * block scale``, accumulate in FP32 and apply
both decode factors at once, as one FP32 ``alpha`` (NVFP4_RECIPE.md sections 6 and 8): that is
what a Blackwell block-scaled MMA computes, up to the FP32 summation order.
:func:`gemm_alpha` is the one definition of alpha and :func:`emulated_gemm` the one definition of
that GEMM; fast backends (``rayfp4.kernels``, ``cutlass_kernels``) delegate to them or are tested
against them.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import e2m1
from ._blocks import per_row, scale_rows
from .blocked import to_blocked

__all__ = ["QuantizedTensor", "check_gemm_operands", "gemm_alpha", "fp32_gemm", "emulated_gemm"]


@dataclass(kw_only=True)
class QuantizedTensor(ABC):
    """An [M, K] tensor quantized along K to E2M1 codes with block scales.

    data:       uint8 [M, K // 2], two E2M1 codes a byte (element 2j in the low nibble)
    scale:      [M, K // block], one byte per block in the format's scale encoding (for square
                tiles each row holds its tile's scale)
    shape:      (M, K)
    tile:       (1, block) blocks or (block, block) tiles
    rht:        whether the values were Hadamard-transformed along K before quantizing
    rounding:   "nearest" or "stochastic"
    orig_dtype: dtype of the quantized input (the default dtype to dequantize into)

    Two companions a fast quantizer may write in the same pass. They are not constructor
    arguments, so ``dataclasses.replace`` (which builds a new tensor from the constructor fields,
    e.g. with another amax) never carries one that no longer matches the fields:

    gemm_operand: BF16 [M, K], possibly a transposed view: equal to
                  ``dequantize_unscaled(torch.bfloat16)``, the GEMM operand of the emulation
    transposed:   the quantized transpose, equal to what :meth:`transpose` computes; returned by it
    """

    #: Elements per block along K (16 for NVFP4, 32 for MXFP4).
    block: ClassVar[int]

    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    tile: tuple[int, int]
    rht: bool = False
    rounding: str = "nearest"
    orig_dtype: torch.dtype = torch.float32
    gemm_operand: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    transposed: QuantizedTensor | None = field(default=None, init=False, repr=False, compare=False)

    # -- what each format defines ------------------------------------------------------------

    @abstractmethod
    def block_scales(self) -> torch.Tensor:
        """The block scales as FP32 values, [M, K // block]."""

    @abstractmethod
    def decode_factor(self) -> torch.Tensor | None:
        """The tensor-level factor of the values as an FP32 0-dim tensor, or None if the format
        has none. The GEMM applies the product of both operands' factors once (:func:`gemm_alpha`)."""

    # -- common to both formats --------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.data.device

    def codes(self) -> torch.Tensor:
        """E2M1 codes (uint8 0..15) as [M, K]."""
        return e2m1.unpack(self.data)

    def tile_scales(self) -> torch.Tensor:
        """One scale per block or tile: [M // tile rows, K // block], in the stored encoding."""
        return self.scale[:: self.tile[0]]

    def dequantize_unscaled(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """E2M1 value x block scale, without the decode factor: exact in BF16, FP16 and FP32.

        This is what an exact emulation of the block-scaled GEMM multiplies.
        """
        v = scale_rows(e2m1.decode(self.codes()), self.block_scales(), self.block)
        return v.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values ``(e2m1 * block scale) * decode factor``, computed in FP32, then cast to ``dtype``."""
        v = self.dequantize_unscaled(torch.float32)
        factor = self.decode_factor()
        if factor is not None:
            v = v * factor
        return v.to(dtype)

    def transpose(self) -> QuantizedTensor:
        """The quantized transpose [K, M] without requantizing: only for square tiles.

        With one scale per square tile, quantizing W^T gives exactly codes(W)^T and the transposed
        tile scales, so the Dgrad GEMM reuses the Fprop weight codes (recipe section 5). A
        transpose the quantizer already wrote (:attr:`transposed`) is returned as it is.
        """
        if self.transposed is not None:
            return self.transposed
        b = self.block
        if self.tile != (b, b):
            raise ValueError(
                f"transpose() needs {b}x{b} tiles (1x{b} blocks of W^T are different blocks); got tile {self.tile}"
            )
        if self.rht:
            raise ValueError("transpose() of a Hadamard-transformed tensor is not the transform of the transpose")
        m, k = self.shape
        # Through the bytes: float8 tensors cannot be repeated along rows.
        tiles_t = self.tile_scales().view(torch.uint8).t().contiguous()
        return dataclasses.replace(
            self,
            data=e2m1.pack(self.codes().t().contiguous()),
            scale=per_row(tiles_t, b).view(self.scale.dtype),
            shape=(k, m),
        )

    def tensor_fields(self) -> dict[str, torch.Tensor]:
        """The constructor fields that hold tensors (codes, scales and any tensor scale), by name:
        what ``save_for_backward`` must carry to rebuild this tensor with ``dataclasses.replace``."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and isinstance(getattr(self, f.name), torch.Tensor)
        }

    def nbytes(self) -> int:
        """Bytes held by codes and scales: what saving this instead of the input costs."""
        return self.data.numel() + self.scale.numel()

    def blocked_scale(self) -> torch.Tensor:
        """The scales in the 128x4 blocked layout of Blackwell GEMMs (flat)."""
        return to_blocked(self.scale)


# ---------------------------------------------------------------------------------- the GEMM


def check_gemm_operands(a: QuantizedTensor, b: QuantizedTensor) -> None:
    """``a`` [M, K] and ``b`` [N, K] must be quantized along the same K."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"GEMM operands disagree on K: a is {tuple(a.shape)}, b is {tuple(b.shape)}")


def gemm_alpha(a: QuantizedTensor, b: QuantizedTensor) -> torch.Tensor:
    """The FP32 factor the GEMM ``a @ b.T`` applies once after accumulating: the product of both
    operands' decode factors, ``(amax_a / 2688) * (amax_b / 2688)`` for NVFP4, 1 for MXFP4.

    A 0-dim FP32 tensor on the amaxes' device (no host sync). Fast kernels that compute it on the
    device are tested against this bit for bit.
    """
    if type(a) is not type(b):
        raise ValueError(f"cannot multiply a {type(a).__name__} operand with a {type(b).__name__} operand")
    fa, fb = a.decode_factor(), b.decode_factor()
    if fa is None:
        return torch.ones((), dtype=torch.float32, device=a.device)
    return fa * fb


def fp32_gemm(a_values: torch.Tensor, b_values: torch.Tensor, alpha, out_dtype: torch.dtype) -> torch.Tensor:
    """``out_dtype(fp32(a) @ fp32(b).T * alpha)``: FP32 products and accumulation, ``alpha`` (a float
    or a one-element tensor) applied once in FP32, one rounding to ``out_dtype``.

    On the unscaled operands of two quantized tensors (exact in BF16 and FP32) this is the emulated
    block-scaled GEMM; fast GEMMs must equal it up to the FP32 summation order.
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=a_values.device).reshape(())
    return (a_values.float() @ b_values.float().t() * alpha).to(out_dtype)


def emulated_gemm(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b.T`` for quantized a [M, K] and b [N, K] of one format: FP32 accumulation of the
    unscaled operands, :func:`gemm_alpha` in FP32, one rounding to ``out_dtype``."""
    check_gemm_operands(a, b)
    return fp32_gemm(a.dequantize_unscaled(torch.float32), b.dequantize_unscaled(torch.float32),
                     gemm_alpha(a, b), out_dtype)
