"""MXFP4 (OCP microscaling): E2M1 elements, one power-of-two (UE8M0) scale per 32 elements.

For comparison runs against NVFP4. No tensor-level scale. The block scale is ``2^e`` with ``e``
chosen by ``scale_rule``:

- ``"ceil"`` (default): the smallest e with ``6 * 2^e >= amax_b``, i.e. ``e = ceil(log2(amax_b/6))``
  computed exactly from the binary exponent of amax_b (no rounded division), so no element ever
  saturates. This is the rule of the NVFP4 paper's MXFP4 baseline.
- ``"floor"``: the OCP MX specification's ``e = floor(log2(amax_b)) - 2``. Elements up to 8 * 2^e
  can occur, and those above 6 * 2^e saturate to +-6.

``e`` is clamped to the UE8M0 range [-127, 127] (a block of zeros gets 2^-127). Scales are
stored as uint8 biased exponents ``e + 127`` (255, the E8M0 NaN, never occurs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import e2m1
from ._blocks import block_amax, check_input, check_rounding, check_tile, encode, per_row, scale_rows, to_fp32
from .blocked import blocked_size, from_blocked, to_blocked  # noqa: F401  (public API)
from .quantized import QuantizedTensor

BLOCK = 32
TILES = ((1, 32), (32, 32))
SCALE_RULES = ("ceil", "floor")
E8M0_BIAS = 127

__all__ = ["MXFP4Tensor", "quantize", "scale_exponents", "to_blocked", "from_blocked", "blocked_size"]


def scale_exponents(amax_b: torch.Tensor, scale_rule: str = "ceil") -> torch.Tensor:
    """Block scale exponents (int32) for block amaxes (FP32, >= 0) under ``scale_rule``."""
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"mxfp4: unknown scale_rule {scale_rule!r}; expected 'ceil' or 'floor'")
    mant, exp = torch.frexp(amax_b.to(torch.float32))  # amax_b = mant * 2^exp, mant in [0.5, 1)
    exp = exp.to(torch.int32)
    if scale_rule == "floor":
        e = exp - 3  # floor(log2(amax_b)) = exp - 1
    else:
        # 6 * 2^e >= mant * 2^exp  <=>  e - exp >= log2(mant / 6), with mant/6 in [1/12, 1/6):
        # e = exp - 3 when mant <= 0.75 (6/8), else exp - 2.
        e = exp - 3 + (mant > 0.75).to(torch.int32)
    e = torch.where(amax_b == 0, torch.full_like(e, -E8M0_BIAS), e)
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)


@dataclass(kw_only=True)
class MXFP4Tensor(QuantizedTensor):
    """A quantized [M, K] tensor (the fields of :class:`QuantizedTensor`, and):

    scale:      uint8 [M, K // 32], UE8M0 biased exponents
    scale_rule: "ceil" or "floor", the rule the exponents were chosen by

    No tensor scale: the decode factor is 1 (None), and the values are exact in BF16 in the normal
    range.
    """

    block: ClassVar[int] = BLOCK

    tile: tuple[int, int] = (1, 32)
    scale_rule: str = "ceil"

    def scale_exponents(self) -> torch.Tensor:
        return self.scale.to(torch.int32) - E8M0_BIAS

    def block_scales(self) -> torch.Tensor:
        return _pow2(self.scale_exponents())

    def decode_factor(self) -> None:
        return None


def quantize(
    x: torch.Tensor,
    tile=(1, 32),
    rounding: str = "nearest",
    rht: bool = False,
    generator: torch.Generator | None = None,
    scale_rule: str = "ceil",
    rht_signs: torch.Tensor | None = None,
) -> MXFP4Tensor:
    """Quantize a 2-D tensor [M, K] to MXFP4 along K (blocks of 32, or 32x32 tiles).

    Arguments as :func:`rayfp4.formats.nvfp4.quantize`, plus ``scale_rule`` ("ceil" or "floor").
    """
    what = "mxfp4.quantize"
    tile = check_tile(tile, TILES, what)
    rounding = check_rounding(rounding, what)
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"{what}: unknown scale_rule {scale_rule!r}; expected 'ceil' or 'floor'")
    check_input(x, tile, what)
    m, k = x.shape
    th, tw = tile

    xf = to_fp32(x, rht, rht_signs)
    e = scale_exponents(block_amax(xf, tile), scale_rule)
    y = scale_rows(xf, per_row(_pow2(-e), th), tw)  # multiplying by 2^-e is exact in FP32
    codes = encode(y, rounding, generator)
    return MXFP4Tensor(
        data=e2m1.pack(codes),
        scale=per_row((e + E8M0_BIAS).to(torch.uint8), th),
        shape=(m, k),
        tile=tile,
        scale_rule=scale_rule,
        rounding=rounding,
        rht=bool(rht),
        orig_dtype=x.dtype,
    )
